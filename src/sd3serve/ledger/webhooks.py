"""Signed webhooks, kept in the database: secrets, the outbox of finished tasks, deliveries and their attempts.

A v2 task that asks for a webhook gets a ``task_webhooks`` row in the transaction that creates it. Once the task
ends (COMPLETED, FAILED or CANCELLED, by whatever process), ``enqueue_finished`` turns that row into a delivery
with its payload, once. Any process then picks ``due`` deliveries, ``lease``s the ones it starts (for longer than an
attempt may take, so no other process sends the same attempt), sends them, and ``record``s each attempt; a failed one
is retried with back-off for hours, and survives restarts because it lives here. Every time comes from the
database's clock, so tests drive the real schedule.
"""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from sd3serve.ledger.schema import (
    CANCELLED,
    COMPLETED,
    FAILED,
    Task,
    TaskImage,
    TaskWebhook,
    WebhookAttempt,
    WebhookDelivery,
    WebhookSecret,
)

EVENTS = {COMPLETED: "completed", FAILED: "failed", CANCELLED: "cancelled"}
# Seconds to wait after each failed attempt: 9 attempts over about 7.7 hours, then the delivery is given up.
RETRY_DELAYS_S = (5, 30, 120, 600, 1800, 3600, 7200, 14400)
PENDING, DELIVERED, GAVE_UP = "pending", "delivered", "failed"
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Due:
    """A delivery that may be sent now: enough to choose among them by key and target."""

    id: str
    key_id: int
    url: str


@dataclass(frozen=True)
class Delivery:
    id: str
    key_id: int
    url: str
    payload: str
    secret: str
    attempts: int
    owner: str  # the process that leased it; only that process records its attempt


class Webhooks:
    """Secrets, subscriptions, deliveries and attempts, in the caller's transaction; times from ``clock``."""

    def __init__(self, session: Session, *, clock: Clock = utc_now) -> None:
        self.s = session
        self._clock = clock

    def rotate_secret(self, *, key_id: int) -> str:
        """A new signing secret for the key (the old one stops signing at once); returned here only."""
        secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")
        self.s.merge(WebhookSecret(key_id=key_id, secret=secret, created_at=datetime.now(UTC)))
        return secret

    def has_secret(self, *, key_id: int) -> bool:
        return self.s.get(WebhookSecret, key_id) is not None

    def subscribe(self, *, task_id: str, key_id: int, url: str, events: list[str], base_url: str) -> None:
        """Where to POST the task's outcome (in the transaction that creates the task)."""
        self.s.add(TaskWebhook(task_id=task_id, key_id=key_id, url=url, events=",".join(events), base_url=base_url))

    def enqueue_finished(self) -> int:
        """Turn the subscriptions of tasks that have ended into deliveries (once each); returns how many."""
        made = 0
        rows = self.s.execute(
            select(TaskWebhook, Task)
            .join(Task, Task.id == TaskWebhook.task_id)
            .where(TaskWebhook.enqueued.is_(False), Task.status.in_(list(EVENTS)))
            .limit(100)
        ).all()
        for hook, task in rows:
            hook.enqueued = True
            event = EVENTS[task.status]
            if event not in hook.events.split(","):
                continue
            count = len(self.s.scalars(select(TaskImage.index).where(TaskImage.task_id == task.id)).all())
            now = self._clock()
            self.s.add(
                WebhookDelivery(
                    id=f"msg_{uuid.uuid4().hex}", key_id=hook.key_id, task_id=task.id, url=hook.url,
                    payload=_payload(task, event, hook.base_url, count, now), status=PENDING,
                    next_attempt_at=now, created_at=now,
                )
            )  # fmt: skip
            made += 1
        return made

    def due(self, *, limit: int, per_key: int, skip_keys: Collection[int] = ()) -> list[Due]:
        """Due, unleased deliveries, oldest first: at most ``per_key`` of each key (so one key's backlog never hides
        another key's deliveries) and none of ``skip_keys`` (keys with no free slot in the caller)."""
        now = self._clock()
        rank = (
            func.row_number()
            .over(partition_by=WebhookDelivery.key_id, order_by=(WebhookDelivery.next_attempt_at, WebhookDelivery.id))
            .label("rank")
        )
        columns = (WebhookDelivery.id, WebhookDelivery.key_id, WebhookDelivery.url, WebhookDelivery.next_attempt_at)
        ready = (
            select(*columns, rank)
            .where(
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
                WebhookDelivery.key_id.not_in(list(skip_keys)),
            )
            .subquery()
        )
        query = (
            select(ready.c.id, ready.c.key_id, ready.c.url)
            .where(ready.c.rank <= per_key)
            .order_by(ready.c.next_attempt_at, ready.c.id)
            .limit(limit)
        )
        return [Due(id_, key_id, url) for id_, key_id, url in self.s.execute(query)]

    def lease(self, ids: Collection[str], *, owner: str, seconds: float) -> list[Delivery]:
        """Lease the given deliveries to ``owner`` for ``seconds`` (longer than an attempt may take; a process that
        dies holding one leaves it to the others after that); returns those this call leased: a delivery leased
        by another process meanwhile, or no longer due, is left out."""
        if not ids:
            return []
        now = self._clock()
        until = now + timedelta(seconds=seconds)
        self.s.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id.in_(list(ids)),
                WebhookDelivery.status == PENDING,
                WebhookDelivery.next_attempt_at <= now,
                or_(WebhookDelivery.lease_until.is_(None), WebhookDelivery.lease_until < now),
            )
            .values(lease_owner=owner, lease_until=until)
        )
        rows = self.s.execute(
            select(WebhookDelivery, WebhookSecret.secret)
            .join(WebhookSecret, WebhookSecret.key_id == WebhookDelivery.key_id, isouter=True)
            .where(
                WebhookDelivery.id.in_(list(ids)),
                WebhookDelivery.lease_owner == owner,
                WebhookDelivery.lease_until == until,
            )
            .execution_options(populate_existing=True)
        ).all()
        return [Delivery(d.id, d.key_id, d.url, d.payload, secret or "", d.attempts, owner) for d, secret in rows]

    def record(
        self, delivery: Delivery, *, status_code: int | None, error: str | None, duration_ms: float,
        give_up: bool = False,
    ) -> str:  # fmt: skip
        """One attempt: delivered on a 2xx, else retried after the next delay of ``RETRY_DELAYS_S`` (given up after
        the last one, or at once when it can never succeed). Returns the delivery's state; an attempt whose lease
        was lost is kept in the attempts but changes nothing."""
        ok = status_code is not None and 200 <= status_code < 300
        attempts = delivery.attempts + 1
        now = self._clock()
        if ok:
            state, next_at = DELIVERED, now
        elif give_up or attempts > len(RETRY_DELAYS_S):
            state, next_at = GAVE_UP, now
        else:
            state, next_at = PENDING, now + timedelta(seconds=RETRY_DELAYS_S[attempts - 1])
        self.s.add(WebhookAttempt(delivery_id=delivery.id, at=now, status_code=status_code, error=error,
                             duration_ms=duration_ms))  # fmt: skip
        self.s.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery.id,
                WebhookDelivery.lease_owner == delivery.owner,
                WebhookDelivery.status == PENDING,
            )
            .values(status=state, attempts=attempts, next_attempt_at=next_at, lease_owner=None, lease_until=None)
        )
        return state

    def deliveries(self, *, task_id: str) -> list[tuple[str, str, int]]:
        """(id, status, attempts) of a task's deliveries, for tests and operators."""
        rows = self.s.scalars(select(WebhookDelivery).where(WebhookDelivery.task_id == task_id))
        return [(d.id, d.status, d.attempts) for d in rows]

    def attempts(self, *, delivery_id: str) -> list[tuple[datetime, int | None, str | None]]:
        """(when, status code, error) of each attempt of a delivery, oldest first, for tests and operators."""
        rows = self.s.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)
        )
        return [(a.at, a.status_code, a.error) for a in rows]

    def retry_now(self, *, task_id: str) -> None:
        """Make a task's pending deliveries due now (operators; tests that cannot wait for the back-off)."""
        self.s.execute(
            update(WebhookDelivery)
            .where(and_(WebhookDelivery.task_id == task_id, WebhookDelivery.status == PENDING))
            .values(next_attempt_at=self._clock())
        )


def _payload(task: Task, event: str, base_url: str, image_count: int, now: datetime) -> str:
    data: dict[str, object] = {"request_id": task.id, "status": task.status, "seed": task.seed}
    if task.status == COMPLETED:
        data["output"] = [f"{base_url}/v2/requests/{task.id}/images/{i}" for i in range(image_count)]
        data["metrics"] = {"inference_time": round(task.inference_time or 0.0, 4)}
    else:
        data["error"] = task.error
    data["response_url"] = f"{base_url}/v2/requests/{task.id}"
    stamp = now.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    return json.dumps({"type": f"task.{event}", "timestamp": stamp, "data": data})
