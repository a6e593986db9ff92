"""The ledger: the database, this process's place in it, and every operation the service asks of it.

Everything that changes rows goes through ``transaction()`` (one :class:`~sd3serve.ledger.database.Tx`: the
repositories over one session). The operations that settle money are here, composed from repository calls in one
transaction each: a hold with what it pays for (``reserve``), a charge with what it delivers (``capture``), a
refund with what it answers (``release``). ``run`` and ``call`` are the async façade: the service and the routes
never leave the event loop any other way for the database.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from typing import ParamSpec, TypeVar

import anyio
from sqlalchemy.exc import DBAPIError, IntegrityError

from sd3serve.errors import ReservationLost
from sd3serve.ledger.credits import CreditHold, from_micro, lock_keys
from sd3serve.ledger.database import Database, Tx, dedicated_engine
from sd3serve.ledger.idempotency import Claim
from sd3serve.ledger.webhooks import Clock, utc_now

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")
HoldWork = Callable[[Tx, CreditHold], None]  # what a hold pays for, in the hold's (or its settlement's) transaction

LOST = (
    "this request's credit hold was returned before delivery (it was cancelled, or this server was presumed dead); "
    "nothing was delivered or charged"
)


class Ledger:
    def __init__(self, db: Database, *, owns: bool = True, instance_id: str | None = None) -> None:
        """The ledger over ``db``; ``owns``: closing the ledger closes ``db`` too. ``instance_id`` names this
        process in the database (a new one by default)."""
        self.db = db
        self._owns = owns
        self._instance_id = instance_id or uuid.uuid4().hex
        self._beats = Database(dedicated_engine(db.engine))  # never waits behind requests for a connection
        self._deferred: list[CreditHold] = []  # releases that failed (database away), retried by housekeeping
        self._deferred_lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None

    @classmethod
    def open(cls, url: str, *, clock: Clock = utc_now, instance_id: str | None = None) -> Ledger:
        return cls(Database.open(url, clock=clock), owns=True, instance_id=instance_id)

    @property
    def instance_id(self) -> str:
        """This process's id now (a new one after it learns that it was presumed dead)."""
        return self._instance_id

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self.db.transaction() as tx:
            yield tx

    # --- the async façade --------------------------------------------------------------------------------

    async def run(self, work: Callable[[Tx], T]) -> T:
        """``work(tx)`` in one transaction, on a worker thread; the event loop goes on meanwhile."""
        return await self.call(self._in_transaction, work)

    async def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """A blocking ledger call (``reserve``, ``capture``, ...) on a worker thread. At most as many run at once
        as the database has connections: the rest wait here, not holding a thread."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._connections())
        return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs), limiter=self._limiter)

    def _in_transaction(self, work: Callable[[Tx], T]) -> T:
        with self.db.transaction() as tx:
            return work(tx)

    def _connections(self) -> int:
        pool = self.db.engine.pool
        size = getattr(pool, "size", None)
        overflow = getattr(pool, "_max_overflow", 0)
        return max(4, size() + max(overflow, 0)) if callable(size) else 4

    # --- money -------------------------------------------------------------------------------------------

    def hold(
        self, *, key_id: int, credits: Decimal, request_id: str, owner: str | None = None,
        with_hold: HoldWork | None = None,
    ) -> CreditHold:  # fmt: skip
        """Take ``credits`` from the balance for a request in flight (InsufficientCredits if it is short), owned by
        this process unless ``owner`` says otherwise; ``with_hold(tx, hold)`` runs in the same transaction (a v2
        task is created with its hold, or neither is)."""
        with self.db.transaction() as tx:
            hold = tx.credits.hold(key_id=key_id, credits=credits, request_id=request_id,
                                   owner=self._instance_id if owner is None else owner)  # fmt: skip
            if with_hold is not None:
                with_hold(tx, hold)
            return hold

    def reserve(
        self, *, key_id: int, credits: Decimal, request_id: str, owner: str | None = None,
        with_hold: HoldWork | None = None,
    ) -> Reservation:  # fmt: skip
        """``hold``, wrapped in the :class:`Reservation` that settles it exactly once."""
        hold = self.hold(key_id=key_id, credits=credits, request_id=request_id, owner=owner, with_hold=with_hold)
        return Reservation(self, hold)

    def capture(self, hold: CreditHold, *, deliver: HoldWork | None = None) -> float:
        """Spend a hold and, in the same transaction, ``deliver(tx, hold)`` (a v2 task's images): both or neither.
        ReservationLost if the hold is gone (cancelled, or this process was presumed dead and it was returned).
        Returns the key's balance as this transaction left it."""
        with self.db.transaction() as tx:
            # The key first; every path that settles a hold locks its key before, so the hold seen here stays.
            lock_keys(tx.session, [hold.key_id])
            gone = not tx.credits.exists(hold)
            if not gone and deliver is not None:  # the task row (if any) before the hold row: the lock order
                deliver(tx, hold)
            if gone or not tx.credits.capture(hold):
                raise ReservationLost(LOST)
            return from_micro(tx.credits.balance_micro(hold.key_id))

    def release(self, hold: CreditHold, *, also: HoldWork | None = None) -> None:
        """Return a hold to the balance; ``also(tx, hold)`` runs in the same transaction (a v2 task marked FAILED
        with its refund)."""
        with self.db.transaction() as tx:
            lock_keys(tx.session, [hold.key_id])
            if also is not None:  # the task row before the hold row: the lock order
                also(tx, hold)
            tx.credits.release(hold)

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

    # --- idempotency -------------------------------------------------------------------------------------

    def claim(self, claim: Claim, *, fingerprint: str) -> bytes | None:
        """Claim an Idempotency-Key for a new request (None: run it), or return the answer of the first request
        that used it. IdempotencyConflict if that one had another body; IdempotencyInProgress while it runs."""
        with self.db.transaction() as tx:
            tx.idempotency.forget_expired(claim)
        try:
            with self.db.transaction() as tx:
                tx.idempotency.insert_claim(claim, fingerprint=fingerprint)
            return None
        except IntegrityError:
            pass  # claimed before: by an earlier request, or by a concurrent one that won the insert
        with self.db.transaction() as tx:
            return tx.idempotency.earlier_answer(claim, fingerprint=fingerprint)

    # --- this process among the others ----------------------------------------------------------------------

    def register(self) -> None:
        with self._beats.transaction() as tx:
            tx.instances.register(self._instance_id)

    def heartbeat(self) -> bool:
        """Prove this process alive. False if another process declared it dead meanwhile (its tasks failed and its
        holds returned): the caller must abort what it still runs, whose holds are gone; this process then goes
        on under a new id, so work it admits from now on is its own again."""
        with self._beats.transaction() as tx:
            if tx.instances.beat(self._instance_id):
                return True
        log.error("process %s was presumed dead by another process; continuing under a new id", self._instance_id)
        self._instance_id = uuid.uuid4().hex
        self.register()
        return False

    def unregister(self) -> None:
        with self.db.transaction() as tx:
            tx.instances.unregister(self._instance_id)

    def settle_dead(self, *, dead_after: timedelta) -> int:
        """Fail the tasks and return the holds of every process whose heartbeat stopped, and of owners that are not
        registered at all (orphans older than ``dead_after``); one transaction per owner. Returns how many owners
        were settled."""
        cutoff = datetime.now(UTC) - dead_after
        with self.db.transaction() as tx:
            dead = tx.instances.dead_owners(cutoff=cutoff, me=self._instance_id)
        for owner in dead:
            with self.db.transaction() as tx:
                settled = tx.instances.settle(owner, cutoff=cutoff)
            if settled is not None:
                log.warning("process %s died: %d task(s) failed, %d hold(s) returned", owner, *settled)
        return len(dead)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Create what is missing of the schema and register this process (it heartbeats from now on)."""
        self.db.create_schema()
        self.register()

    def housekeep(self, *, dead_after: timedelta) -> int:
        """The periodic work: settle processes silent for ``dead_after`` (their tasks failed, holds returned), retry
        refunds deferred while the database was away, expire finished results and idempotent answers (and give
        their space back), drop rate-limit windows that ended. Returns how many expired rows were deleted."""
        self.settle_dead(dead_after=dead_after)
        self.retry_deferred()
        with self.db.transaction() as tx:
            expired = tx.tasks.delete_expired() + tx.idempotency.delete_expired()
            tx.rates.prune(before_window=int(time.time() // 60) - 1)
        if expired:
            self.db.reclaim()
        return expired

    def stop(self) -> None:
        """On shutdown, after the heartbeat stopped: the last deferred refunds, and this process unregistered."""
        self.retry_deferred()
        self.unregister()

    def close(self) -> None:
        if self._beats.engine is not self.db.engine:
            self._beats.close()
        if self._owns:
            self.db.close()


class Reservation:
    """A request's credits from admission to delivery: held at creation, then settled exactly once.

    ``capture`` spends them when the images are delivered (with the delivery in the same transaction); ``close``
    returns them if nothing was captured — on any failure, cancel or disconnect — and is idempotent, so callers end
    with ``finally: reservation.close()``. Blocking (database) calls: run them through ``Ledger.call``.
    """

    def __init__(self, ledger: Ledger, hold: CreditHold) -> None:
        self.ledger = ledger
        self.hold = hold
        self._settled = False

    @property
    def credits(self) -> float:
        return from_micro(self.hold.amount_micro)

    @property
    def settled(self) -> bool:
        """Captured or refunded (or its refund deferred): ``close`` has nothing left to do."""
        return self._settled

    def capture(self, *, deliver: HoldWork | None = None) -> float:
        """Charge (and deliver); returns the remaining balance. On ReservationLost the hold is already gone."""
        try:
            remaining = self.ledger.capture(self.hold, deliver=deliver)
        except ReservationLost:
            self._settled = True
            raise
        self._settled = True
        return remaining

    def fail(self, *, also: HoldWork | None = None) -> None:
        """Refund now, with ``also`` in the refund's transaction; raises if the database is away (retry it)."""
        if not self._settled:
            self.ledger.release(self.hold, also=also)
            self._settled = True

    def close(self) -> None:
        """Refund unless captured; if the database is away, the refund is retried by housekeeping."""
        if not self._settled:
            self._settled = True
            self.ledger.release_or_defer(self.hold)
