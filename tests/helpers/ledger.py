"""The ledger for tests: ``Store`` makes each call its own transaction, so a test reads as a sequence of ledger
operations (``store.create_key(...)``, ``store.reserve(...)``, ``store.get(...)``) without writing the
``with ledger.transaction() as tx:`` block around each. The steps (``creation``, ``completion``, ...) are the
``HoldWork`` the service composes into a hold's transaction."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from sd3serve.ledger import CreditHold, Database, HoldWork, Ledger, Tx
from sd3serve.ledger.credits import Credits
from sd3serve.ledger.idempotency import Claim, Idempotency
from sd3serve.ledger.keys import Keys
from sd3serve.ledger.ratelimit import RateWindows
from sd3serve.ledger.recovery import Instances
from sd3serve.ledger.tasks import Tasks
from sd3serve.ledger.webhooks import Clock, Webhooks, utc_now

# Repository methods under the names the tests use, where the repository's own name is ambiguous.
ALIASES = {
    "create_key": ("keys", "create"),
    "list_keys": ("keys", "all"),
    "get_key": ("keys", "get"),
    "get": ("tasks", "get"),
    "prune_rate_windows": ("rates", "prune"),
}


class Store:
    """A ledger whose repository methods each run in a transaction of their own; ledger operations (``reserve``,
    ``capture``, ``settle_dead``, ...) are the ledger's own."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.db = ledger.db
        self.engine = ledger.db.engine

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and hasattr(self.ledger, name):
            return getattr(self.ledger, name)
        repo, method = ALIASES.get(name, (None, name))
        for candidate in (repo,) if repo else _REPOSITORY_TYPES:
            if hasattr(_REPOSITORY_TYPES[candidate], method):
                return self._in_transaction(candidate, method)
        raise AttributeError(name)

    def _in_transaction(self, repo: str, method: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with self.db.transaction() as tx:
                return getattr(getattr(tx, repo), method)(*args, **kwargs)

        return call

    def begin(self, *, key_id: int, idem_key: str, fingerprint: str) -> bytes | None:
        """Claim an Idempotency-Key (``Ledger.claim``)."""
        return self.ledger.claim(Claim(key_id, idem_key), fingerprint=fingerprint)

    def create_schema(self) -> None:
        self.db.create_schema()

    def reclaim(self) -> None:
        self.db.reclaim()

    def close(self) -> None:
        self.ledger.close()


_REPOSITORY_TYPES: dict[str, type] = {
    "keys": Keys, "credits": Credits, "tasks": Tasks, "idempotency": Idempotency, "webhooks": Webhooks,
    "rates": RateWindows, "instances": Instances,
}  # fmt: skip


def open_store(url: str, *, clock: Clock = utc_now, instance_id: str | None = None) -> Store:
    """A ledger of its own on ``url`` (its schema is not created: ``create_schema``)."""
    return Store(Ledger.open(url, clock=clock, instance_id=instance_id))


def sharing(store: Store, *, clock: Clock | None = None, instance_id: str | None = None) -> Store:
    """Another process's ledger on the same database (another instance id; its own clock if given)."""
    db = store.db if clock is None else Database(store.engine, clock=clock)
    return Store(Ledger(db, owns=False, instance_id=instance_id))


# --- what a hold pays for (the service's steps) -------------------------------------------------------------


def creation(
    *, task_id: str, key_id: int, seed: int, base64: bool = False, media_type: str = "image/jpeg",
    request_json: str = "{}", owner: str = "",
) -> HoldWork:  # fmt: skip
    def create(tx: Tx, hold: CreditHold) -> None:
        tx.tasks.create(task_id=task_id, key_id=key_id, hold=hold, seed=seed, base64=base64, media_type=media_type,
                        request_json=request_json, owner=owner)  # fmt: skip

    return create


def completion(
    task_id: str, *, images: list[bytes], inference_time: float = 1.0, steps: int = 4,
    ttl: timedelta = timedelta(hours=1),
) -> HoldWork:  # fmt: skip
    def complete(tx: Tx, hold: CreditHold) -> None:
        tx.tasks.complete(task_id, hold=hold, images=images, inference_time=inference_time, steps=steps, ttl=ttl)

    return complete


def failure(task_id: str, *, error: str, ttl: timedelta = timedelta(hours=1)) -> HoldWork:
    def fail(tx: Tx, _hold: CreditHold) -> None:
        tx.tasks.fail(task_id, error=error, ttl=ttl)

    return fail


def answered(claim: Claim, answer: bytes) -> HoldWork:
    def record(tx: Tx, _hold: CreditHold) -> None:
        tx.idempotency.answer(claim, answer)

    return record


def subscription(*, task_id: str, key_id: int, url: str, events: list[str], base_url: str) -> HoldWork:
    def subscribe(tx: Tx, _hold: CreditHold) -> None:
        tx.webhooks.subscribe(task_id=task_id, key_id=key_id, url=url, events=events, base_url=base_url)

    return subscribe
