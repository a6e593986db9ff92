"""The ledger on SQLite and on the PostgreSQL that runs on this machine (a database of its own)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from helpers.ledger import Store, open_store, sharing

PG_ADMIN_URL = os.environ.get("SD3SERVE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    name = f"sd3serve_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'credits.db'}"
        return
    pg_url: str = request.getfixturevalue("pg_database")
    yield pg_url
    # Each test starts from empty tables.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    """The ledger on a fresh schema, closed after the test."""
    s = open_store(store_url)
    s.create_schema()
    yield s
    s.close()


@pytest.fixture
def stores(store: Store) -> tuple[Store, Store]:
    """The ledger of two server processes on one database (two instance ids): one takes the credits side of a
    test, the other the tasks side, as when a task is submitted to one process and read or cancelled through
    another."""
    return store, sharing(store)


@pytest.fixture
def west_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The server's local time 5 hours behind UTC (POSIX TZ syntax: no tz database needed)."""
    monkeypatch.setenv("TZ", "EST+5")
    time.tzset()
    try:
        yield
    finally:
        monkeypatch.undo()
        time.tzset()
