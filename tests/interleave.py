"""Putting two database transactions in a chosen order, to test what happens when they race.

``interleave(engine, first, at, second)`` runs ``first`` on this thread. Just before ``first`` sends the first
statement that ``at`` matches, ``second`` starts on another thread; ``first`` resumes once ``second`` has either
ended or is waiting for a lock (PostgreSQL: seen in ``pg_stat_activity``). Each call's result or exception is
returned, so a test can check both sides of the race. No sleeps: the order is forced, not hoped for.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import Engine, event

from waiting import wait_for

WRITE = re.compile(r"^\s*(UPDATE|DELETE|INSERT)\b|\bFOR (NO KEY )?UPDATE\b", re.IGNORECASE)


def statement(prefix: str) -> Callable[[str], bool]:
    """Matches a statement that starts with ``prefix`` (e.g. "UPDATE tasks")."""
    return lambda sql: sql.lstrip().upper().startswith(prefix.upper())


def first_write(sql: str) -> bool:
    """Matches the first statement that writes or locks a row."""
    return WRITE.search(sql) is not None


@dataclass
class Outcome:
    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _run(fn: Callable[[], Any], out: Outcome) -> None:
    try:
        out.value = fn()
    except BaseException as e:  # handed back to the test
        out.error = e


def waiting_on_lock(engine: Engine) -> bool:
    """Whether any other session of this PostgreSQL database is waiting for a lock."""
    url = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        ).fetchone()
    return bool(row and row[0])


def interleave(
    engine: Engine, first: Callable[[], Any], at: Callable[[str], bool], second: Callable[[], Any]
) -> tuple[Outcome, Outcome]:
    me = threading.get_ident()
    fired = threading.Event()
    a, b = Outcome(), Outcome()
    worker = threading.Thread(target=_run, args=(second, b), name="interleave-second")

    def before(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
        if fired.is_set() or threading.get_ident() != me or not at(sql):
            return
        fired.set()
        worker.start()
        if engine.dialect.name == "postgresql":
            wait_for(lambda: not worker.is_alive() or waiting_on_lock(engine), timeout=60)
        else:
            worker.join(timeout=60)  # SQLite: only used where ``first`` holds no write lock yet

    event.listen(engine, "before_cursor_execute", before)
    try:
        _run(first, a)
    finally:
        event.remove(engine, "before_cursor_execute", before)
        if fired.is_set():
            worker.join(timeout=120)
    assert fired.is_set(), "the chosen statement was never sent"
    assert not worker.is_alive(), "the second transaction never finished"
    return a, b
