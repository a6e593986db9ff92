"""The database: its engine, its schema, and the one unit of work every change goes through.

``Database.transaction()`` opens a session and yields a :class:`Tx`, which hands out the repositories over that
session (``tx.keys``, ``tx.credits``, ``tx.tasks``, ...): what they change commits together when the block ends,
or rolls back together when it raises. A hold and the task it pays for, a charge and the images it delivers, a
refund and the failure it answers are each one transaction composed of repository calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from sd3serve.ledger.credits import Credits
from sd3serve.ledger.idempotency import Idempotency
from sd3serve.ledger.keys import Keys
from sd3serve.ledger.ratelimit import RateWindows
from sd3serve.ledger.recovery import Instances
from sd3serve.ledger.schema import Base
from sd3serve.ledger.tasks import Tasks
from sd3serve.ledger.webhooks import Clock, Webhooks, utc_now


def make_engine(url: str) -> Engine:
    """A SQLAlchemy engine; SQLite files get WAL mode and a busy timeout so processes can share them."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if cur.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file: freed pages can then be given back (``Database.reclaim``). Only an empty file takes
                # this, and only before WAL mode is set; an existing file keeps its mode (setting it there would
                # also wait for the write lock).
                cur.execute("PRAGMA auto_vacuum=INCREMENTAL")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA journal_size_limit=67108864")  # the WAL shrinks back to 64 MB after a checkpoint
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def dedicated_engine(engine: Engine) -> Engine:
    """An engine of its own on the same database (the heartbeat's: its connection is never one that requests are
    queued for). An in-memory SQLite database cannot be shared by two engines: it keeps ``engine``."""
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if url.database in (None, "", ":memory:"):
            return engine
        return make_engine(url.render_as_string(hide_password=False))
    return create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)


class Tx:
    """One transaction's session and the repositories over it (plain objects: making them costs nothing)."""

    def __init__(self, session: Session, clock: Clock) -> None:
        self.session = session
        self.clock = clock
        self.keys = Keys(session)
        self.credits = Credits(session)
        self.tasks = Tasks(session)
        self.idempotency = Idempotency(session)
        self.webhooks = Webhooks(session, clock=clock)
        self.rates = RateWindows(session)
        self.instances = Instances(session)


class Database:
    """An engine and its sessions. ``clock`` is the time the webhook schedule runs on (tests inject one)."""

    def __init__(self, engine: Engine, *, clock: Clock = utc_now) -> None:
        self.engine = engine
        self.clock = clock
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, url: str, *, clock: Clock = utc_now) -> Database:
        return cls(make_engine(url), clock=clock)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """The unit of work: commits when the block ends, rolls back if it raises."""
        with self._sessions.begin() as session:
            yield Tx(session, self.clock)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    def reclaim(self) -> None:
        """Give the space of deleted rows back to the file system (SQLite: a file created by this version; the WAL
        itself shrinks to ``journal_size_limit`` at its next checkpoint. PostgreSQL's autovacuum does this)."""
        if self.dialect == "sqlite":
            with self.engine.connect() as conn:
                # Python's sqlite3 steps a statement that has no result columns once, and incremental_vacuum frees
                # one page per step: executescript runs it to the end (all free pages).
                sqlite = conn.connection.driver_connection
                assert sqlite is not None
                sqlite.executescript("PRAGMA incremental_vacuum;")

    def close(self) -> None:
        self.engine.dispose()
