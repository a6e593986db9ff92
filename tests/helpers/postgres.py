"""A PostgreSQL database of a test's own on the local server (127.0.0.1:5432, trust authentication; another
administrative URL in ``SD3SERVE_TEST_PG``), dropped when the test is done with it."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

import psycopg

PG_ADMIN = os.environ.get("SD3SERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def database_url(name: str) -> str:
    """The URL of database ``name`` on the server of ``PG_ADMIN``."""
    return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"


@contextlib.contextmanager
def pg_database(prefix: str) -> Iterator[str]:
    """A new database ``<prefix>_<12 hex digits>``, dropped when the block ends (sessions still on it too): its
    name."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
