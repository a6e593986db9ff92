"""The ledger: one database and every store over it, opened and closed together, with its periodic housekeeping
in one call.

The stores keep their own transactions (a hold and what it pays for commit together: ``CreditStore.reserve`` and
``Reservation.capture`` take the other stores' steps); this class is what the rest of the server holds instead of
six stores and two database engines.
"""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import Engine

from sd3serve.store.credits import CreditStore
from sd3serve.store.idempotency import IdempotencyStore
from sd3serve.store.ratelimit import RateLimiter
from sd3serve.store.recovery import Recovery, dedicated_engine
from sd3serve.store.tasks import TaskStore
from sd3serve.store.webhooks import WebhookStore


class Ledger:
    def __init__(self, credits: CreditStore, *, owns: bool) -> None:
        """The stores over ``credits``'s database; ``owns``: closing the ledger closes that database too."""
        self.credits = credits
        self.db: Engine = credits.engine
        self.tasks = TaskStore(self.db)
        self.idempotency = IdempotencyStore(self.db)
        self.webhooks = WebhookStore(self.db)
        self.rate_limiter = RateLimiter(self.db)
        self._heartbeat_db = dedicated_engine(self.db)  # the heartbeat's connection is never one requests wait for
        self.recovery = Recovery(self.db, heartbeat_engine=self._heartbeat_db)
        self._owns = owns

    @classmethod
    def open(cls, url: str) -> Ledger:
        return cls(CreditStore(url), owns=True)

    def start(self) -> None:
        """Create what is missing of the schema and register this process (it heartbeats from now on)."""
        self.credits.create_schema()
        self.recovery.register()

    def housekeep(self, *, dead_after: timedelta) -> int:
        """The periodic work: settle processes silent for ``dead_after`` (their tasks failed, holds returned),
        retry refunds deferred while the database was away, expire finished results and idempotent answers (and
        give their space back), drop rate-limit windows that ended. Returns how many expired rows were deleted."""
        self.recovery.settle_dead(dead_after=dead_after)
        self.credits.retry_deferred()
        expired = self.tasks.delete_expired() + self.idempotency.delete_expired()
        if expired:
            self.credits.reclaim()
        self.recovery.prune_rate_windows(before_window=int(time.time() // 60) - 1)
        return expired

    def stop(self) -> None:
        """On shutdown, after the heartbeat stopped: the last deferred refunds, and this process unregistered."""
        self.credits.retry_deferred()
        self.recovery.unregister()

    def close(self) -> None:
        if self._heartbeat_db is not self.db:
            self._heartbeat_db.dispose()
        if self._owns:
            self.credits.close()
