"""Keys and credits: the only place where balances change.

A request's cost is *held* (taken from the balance) when it is admitted, in one conditional UPDATE, so two
concurrent requests can never spend the same credit; the hold is *captured* when the images are delivered
or *released* (returned) when the request fails. A :class:`Reservation` wraps one hold and settles it exactly
once; every generation route goes through it. Holds left by a dead process are returned by recovery.py.

Lock order. Every transaction that changes more than one of these rows takes them in one order: the key rows
first (lowest id first, ``lock_keys``), then task rows, then hold rows. Two transactions then never wait on each
other in a cycle (on PostgreSQL a cycle is a deadlock: one of them fails). Hold creation, capture, release,
cancel, revoke and recovery all follow it; expiry touches only finished tasks and their children.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, delete, event, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from sd3serve.errors import InsufficientCredits, InvalidApiKey, InvalidRequest, NotFound, ReservationLost
from sd3serve.store.models import CANCELLED, MICRO, RUNNING, ApiKey, Base, Hold, Task

KEY_PREFIX = "sk-"


def digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


MAX_BALANCE = Decimal(9 * 10**12)  # credits; a balance is a signed 64-bit count of micro-credits (≈ 9.22e12)


def to_micro(credits: Decimal | int | float | str) -> int:
    """Credits as micro-credits; InvalidRequest for an amount finer than one micro-credit or beyond any balance."""
    micro = Decimal(str(credits)) * MICRO
    if not micro.is_finite() or micro != micro.to_integral_value() or abs(micro) > MAX_BALANCE * MICRO:
        raise InvalidRequest(f"{credits} is not an amount of credits the store can keep (at most {MAX_BALANCE}, "
                             "in steps of 0.000001)")  # fmt: skip
    return int(micro)


def from_micro(micro: int) -> float:
    return micro / MICRO


@dataclass(frozen=True)
class KeyInfo:
    id: int
    name: str
    prefix: str
    credits: float
    spent: float
    created_at: datetime
    revoked: bool

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            prefix=row.prefix,
            credits=from_micro(row.balance_micro),
            spent=from_micro(row.spent_micro),
            created_at=row.created_at,
            revoked=row.revoked_at is not None,
        )


@dataclass(frozen=True)
class CreditHold:
    id: int
    key_id: int
    amount_micro: int


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


class CreditStore:
    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self._deferred: list[CreditHold] = []  # releases that failed (database away), retried later
        self._deferred_lock = threading.Lock()

    def create_schema(self) -> None:
        if self.engine.dialect.name == "sqlite":
            with self.engine.begin() as conn:
                if not conn.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'table'").first():
                    # A new file: freed pages can then be given back (``reclaim``). Older files keep their mode.
                    conn.exec_driver_sql("PRAGMA auto_vacuum=INCREMENTAL")
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def reclaim(self) -> None:
        """Give the space of deleted rows back to the file system (SQLite: a file created by this version; the WAL
        itself shrinks to ``journal_size_limit`` at its next checkpoint. PostgreSQL's autovacuum does this)."""
        if self.engine.dialect.name == "sqlite":
            with self.engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA incremental_vacuum")

    # --- keys -------------------------------------------------------------------------------------------

    def create_key(self, *, credits: Decimal | int, name: str = "") -> tuple[KeyInfo, str]:
        """A new key; the plaintext is returned here once and stored only as its sha256 digest."""
        if Decimal(str(credits)) < 0:
            raise ValueError("credits must not be negative")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(
            name=name,
            digest=digest(plaintext),
            prefix=plaintext[:10],
            balance_micro=to_micro(credits),
            spent_micro=0,
        )
        with self._session.begin() as s:
            s.add(row)
            s.flush()
            s.refresh(row)
            info = KeyInfo.of(row)
        return info, plaintext

    def list_keys(self) -> list[KeyInfo]:
        with self._session() as s:
            return [KeyInfo.of(r) for r in s.scalars(select(ApiKey).order_by(ApiKey.id))]

    def get_key(self, *, key_id: int) -> KeyInfo:
        with self._session() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"no key with id {key_id}")
            return KeyInfo.of(row)

    def add_credits(self, *, key_id: int, credits: Decimal | int) -> KeyInfo:
        """Add to a live key's balance, atomically bounded by MAX_BALANCE (the column stays a 64-bit integer).
        A revoked key is refused (InvalidRequest): its credits could never be spent. Returns the key as the
        UPDATE left it."""
        amount = to_micro(credits)
        with self._session.begin() as s:
            row = s.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == key_id,
                    ApiKey.revoked_at.is_(None),
                    ApiKey.balance_micro <= to_micro(MAX_BALANCE) - amount,
                )
                .values(balance_micro=ApiKey.balance_micro + amount)
                .returning(ApiKey)
            ).scalar_one_or_none()
            if row is None:
                existing = s.get(ApiKey, key_id)
                if existing is None:
                    raise NotFound(f"no key with id {key_id}")
                if existing.revoked_at is not None:
                    raise InvalidRequest(f"key {key_id} is revoked: credits cannot be added to it")
                raise InvalidRequest(f"the balance would exceed the maximum of {MAX_BALANCE} credits")
            return KeyInfo.of(row)

    def revoke(self, *, key_id: int) -> KeyInfo:
        """Revoke a key; in the same transaction its unfinished v2 tasks are CANCELLED and their holds returned
        (a revoked key can no longer read results, so nothing it cannot collect is charged)."""
        with self._session.begin() as s:
            # The key row first (the lock order): a hold of this key waits, then finds the key revoked.
            res = s.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            if res.rowcount != 1 and s.get(ApiKey, key_id) is None:  # type: ignore[attr-defined]
                raise NotFound(f"no key with id {key_id}")
            cancel_tasks(s, Task.key_id == key_id, error=REVOKED_MESSAGE, ttl=timedelta(hours=1))
        return self.get_key(key_id=key_id)

    def authenticate(self, *, api_key: str | None) -> KeyInfo:
        """The key's record, or InvalidApiKey for a missing, unknown or revoked key."""
        if not api_key:
            raise InvalidApiKey("missing x-api-key header")
        wanted = digest(api_key)
        with self._session() as s:
            row = s.scalars(select(ApiKey).where(ApiKey.digest == wanted)).first()
            if row is None or not secrets.compare_digest(row.digest, wanted) or row.revoked_at is not None:
                raise InvalidApiKey("invalid or revoked API key")
            return KeyInfo.of(row)

    def balance(self, *, key_id: int) -> float:
        return self.get_key(key_id=key_id).credits

    # --- holds and reservations ---------------------------------------------------------------------------

    def reserve(
        self, *, key_id: int, credits: Decimal, request_id: str, owner: str, with_hold: SessionStep | None = None
    ) -> Reservation:
        """Hold ``credits`` for a request in flight (InsufficientCredits if the balance is short) and return the
        :class:`Reservation` that settles it. ``with_hold(session, hold)`` runs in the hold's transaction (a v2
        task row is created with its hold, or neither is).

        ``owner`` is the server process: if it dies, the hold goes back to the balance (see recovery.py).
        """
        return Reservation(self, self.hold(key_id=key_id, credits=credits, request_id=request_id, owner=owner,
                                           with_hold=with_hold))  # fmt: skip

    def hold(
        self, *, key_id: int, credits: Decimal, request_id: str, owner: str = "", with_hold: SessionStep | None = None
    ) -> CreditHold:
        """Take ``credits`` from the balance for a request in flight, or raise InsufficientCredits."""
        amount = to_micro(credits)
        with self._session.begin() as s:
            res = s.execute(
                update(ApiKey)
                .where(ApiKey.id == key_id, ApiKey.balance_micro >= amount, ApiKey.revoked_at.is_(None))
                .values(balance_micro=ApiKey.balance_micro - amount)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                row = s.get(ApiKey, key_id)
                if row is None or row.revoked_at is not None:
                    raise InvalidApiKey("invalid or revoked API key")
                raise InsufficientCredits(from_micro(row.balance_micro), from_micro(amount))
            row_hold = Hold(key_id=key_id, request_id=request_id, amount_micro=amount, owner=owner)
            s.add(row_hold)
            s.flush()
            hold = CreditHold(id=row_hold.id, key_id=key_id, amount_micro=amount)
            if with_hold is not None:
                with_hold(s, hold)
            return hold

    def capture(self, hold: CreditHold, *, deliver: SessionStep | None = None) -> float:
        """Spend a hold and, in the same transaction, ``deliver(session, hold)`` (a v2 task's images): both or
        neither. ReservationLost if the hold is gone (another process declared this one dead and returned it).
        Returns the key's remaining balance."""
        with self._session.begin() as s:
            # The key first; every path that settles a hold locks its key before, so the hold seen here stays.
            lock_keys(s, [hold.key_id])
            gone = s.scalar(select(Hold.id).where(Hold.id == hold.id)) is None
            if not gone and deliver is not None:  # the task row (if any) before the hold row: the lock order
                deliver(s, hold)
            if gone or not capture_hold(s, hold):
                raise ReservationLost(
                    "this request's credit hold was returned before delivery (it was cancelled, or this server was "
                    "presumed dead); nothing was delivered or charged"
                )
            row = s.get(ApiKey, hold.key_id)
            return from_micro(row.balance_micro) if row else 0.0

    def release(self, hold: CreditHold, *, also: SessionStep | None = None) -> None:
        """Return a hold to the balance (the request failed or was not delivered); ``also(session, hold)`` runs
        in the same transaction (a v2 task marked FAILED with its refund)."""
        with self._session.begin() as s:
            lock_keys(s, [hold.key_id])
            if also is not None:  # the task row before the hold row: the lock order
                also(s, hold)
            release_hold(s, hold)

    def release_or_defer(self, hold: CreditHold) -> None:
        """Release now, or, if the database cannot be reached, remember to (``retry_deferred``)."""
        try:
            self.release(hold)
        except DBAPIError:
            with self._deferred_lock:
                self._deferred.append(hold)

    def retry_deferred(self) -> int:
        """Release the holds whose release failed earlier; returns how many are still pending."""
        with self._deferred_lock:
            pending, self._deferred = self._deferred, []
        failed = []
        for hold in pending:
            try:
                self.release(hold)
            except DBAPIError:
                failed.append(hold)
        with self._deferred_lock:
            self._deferred.extend(failed)
            return len(self._deferred)


SessionStep = Callable[[Session, CreditHold], None]  # a step of the store's transaction that settles a hold


class Reservation:
    """A request's credits from admission to delivery: held at creation, then settled exactly once.

    ``capture`` spends them when the images are delivered (with the delivery in the same transaction);
    ``close`` returns them if nothing was captured — on any failure, cancel or disconnect — and is idempotent,
    so callers end with ``finally: reservation.close()``. Blocking (database) calls: run them off the event loop.
    """

    def __init__(self, store: CreditStore, hold: CreditHold) -> None:
        self.store = store
        self.hold = hold
        self._settled = False

    @property
    def credits(self) -> float:
        return from_micro(self.hold.amount_micro)

    def capture(self, *, deliver: SessionStep | None = None) -> float:
        """Charge (and deliver); returns the remaining balance. On ReservationLost the hold is already gone."""
        try:
            remaining = self.store.capture(self.hold, deliver=deliver)
        except ReservationLost:
            self._settled = True
            raise
        self._settled = True
        return remaining

    def fail(self, *, also: SessionStep | None = None) -> None:
        """Refund now, with ``also`` in the refund's transaction; raises if the database is away (retry it)."""
        if not self._settled:
            self.store.release(self.hold, also=also)
            self._settled = True

    def close(self) -> None:
        """Refund unless captured; if the database is away, the refund is retried by housekeeping."""
        if not self._settled:
            self._settled = True
            self.store.release_or_defer(self.hold)


# Capture and release as steps of a caller's transaction, so that a v2 task's completion and its charge
# commit together. Deleting the hold row is what makes each happen at most once.


def capture_hold(s: Session, hold: CreditHold) -> bool:
    if s.execute(delete(Hold).where(Hold.id == hold.id)).rowcount != 1:  # type: ignore[attr-defined]
        return False
    s.execute(update(ApiKey).where(ApiKey.id == hold.key_id).values(spent_micro=ApiKey.spent_micro + hold.amount_micro))
    return True


REVOKED_MESSAGE = "cancelled: the key was revoked; nothing was charged"


def lock_keys(s: Session, key_ids: list[int]) -> list[int]:
    """In the caller's transaction: lock these key rows, lowest id first (the first step of the lock order), as
    an UPDATE of them would (PostgreSQL ``FOR NO KEY UPDATE``; SQLite has one writer and needs none). Returns
    the ids that exist."""
    if not key_ids:
        return []
    wanted = select(ApiKey.id).where(ApiKey.id.in_(sorted(set(key_ids)))).order_by(ApiKey.id)
    return list(s.scalars(wanted.with_for_update(key_share=True)))


def cancel_tasks(s: Session, *where: Any, error: str, ttl: timedelta) -> list[str]:
    """In the caller's transaction, which has locked the tasks' keys (``lock_keys``): mark the running tasks
    matching ``where`` CANCELLED and return their holds. Returns the ids of the tasks this UPDATE changed, and
    only those: a task that completed or failed meanwhile is untouched (its hold was settled with it)."""
    now = datetime.now(UTC)
    rows = s.execute(
        update(Task)
        .where(*where, Task.status.in_(RUNNING))
        .values(status=CANCELLED, error=error, finished_at=now, expires_at=now + ttl)
        .returning(Task.id, Task.hold_id)
        .execution_options(synchronize_session=False)
    ).all()
    hold_ids = sorted(r.hold_id for r in rows if r.hold_id is not None)
    if hold_ids:
        for h in s.scalars(select(Hold).where(Hold.id.in_(hold_ids)).order_by(Hold.id)):
            release_hold(s, CreditHold(id=h.id, key_id=h.key_id, amount_micro=h.amount_micro))
    return [r.id for r in rows]


def release_hold(s: Session, hold: CreditHold) -> bool:
    if s.execute(delete(Hold).where(Hold.id == hold.id)).rowcount != 1:  # type: ignore[attr-defined]
        return False
    s.execute(
        update(ApiKey).where(ApiKey.id == hold.key_id).values(balance_micro=ApiKey.balance_micro + hold.amount_micro)
    )
    return True
