"""The database's engines (ledger/database.py): a SQLite file is created with its folder, in WAL mode, with a busy
timeout and foreign keys, on every connection; the heartbeat's engine is one of its own with the same settings (an
in-memory database, which two engines cannot share, keeps the one engine); PostgreSQL's heartbeat engine holds a
single connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from sd3serve.ledger.database import dedicated_engine, make_engine


def pragmas(engine: Engine) -> tuple[str, int, int, int]:
    with engine.connect() as conn:
        return (
            str(conn.exec_driver_sql("PRAGMA journal_mode").scalar_one()),
            int(conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one()),
            int(conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one()),
            int(conn.exec_driver_sql("PRAGMA auto_vacuum").scalar_one()),
        )


def test_a_sqlite_file_is_made_in_a_new_folder_with_wal_a_busy_timeout_and_foreign_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    path = tmp_path / "not" / "yet" / "ledger.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        assert pragmas(engine) == ("wal", 30000, 1, 2)  # auto_vacuum 2: INCREMENTAL, for a new file
        assert path.exists()
        assert list(cwd.iterdir()) == []  # the folder made is the file's, nothing where we stand
    finally:
        engine.dispose()


def test_the_heartbeats_sqlite_engine_is_its_own_with_the_same_settings(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    own = dedicated_engine(engine)
    try:
        assert own is not engine and own.url == engine.url
        assert pragmas(own) == pragmas(engine) == ("wal", 30000, 1, 2)
    finally:
        own.dispose()
        engine.dispose()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_an_in_memory_database_keeps_its_one_engine(url: str) -> None:
    engine = make_engine(url)
    assert dedicated_engine(engine) is engine
    engine.dispose()


def test_the_heartbeats_postgresql_engine_holds_one_connection(pg_database: str) -> None:
    engine = make_engine(pg_database)
    own = dedicated_engine(engine)
    try:
        assert own is not engine and own.url == engine.url
        assert own.pool.size() == 1 and own.pool._max_overflow == 0  # type: ignore[attr-defined]
        assert engine.pool.size() == 10 and engine.pool._max_overflow == 20  # type: ignore[attr-defined]
        with own.connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar_one() == 1
    finally:
        own.dispose()
        engine.dispose()
