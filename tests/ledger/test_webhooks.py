"""The webhook outbox (ledger/webhooks.py) on SQLite and PostgreSQL: the body of each event as docs/webhooks.md gives
it, a failed attempt that is retried (not given up) by default, and ``retry_now`` touching only one task's pending
deliveries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from helpers.ledger import Store, completion, creation, failure, open_store, sharing, subscription
from sd3serve.ledger import Reservation
from sd3serve.ledger.webhooks import GAVE_UP, PENDING, RETRY_DELAYS_S, Delivery

TTL = timedelta(hours=1)
BASE = "http://sd3.example"
START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(store_url: str) -> Iterator[tuple[Store, Store, Store, Clock, int]]:
    credits = open_store(store_url)
    credits.create_schema()
    clock = Clock()
    key = credits.create_key(credits=10)[0].id
    yield credits, credits, sharing(credits, clock=clock), clock, key
    credits.close()


def _submit(credits: Store, key: int, task_id: str, seed: int = 7) -> Reservation:
    create = creation(task_id=task_id, key_id=key, seed=seed, base64=False, media_type="image/png",
                                request_json="{}", owner="me")  # fmt: skip
    subscribe = subscription(task_id=task_id, key_id=key, url=f"http://hook.example/{task_id}",
                                          events=["completed", "failed", "cancelled"], base_url=BASE)  # fmt: skip

    def both(s, hold):  # type: ignore[no-untyped-def]
        create(s, hold)
        subscribe(s, hold)

    return credits.reserve(key_id=key, credits=Decimal(1), request_id=task_id, owner="me", with_hold=both)


def _leased(hooks: Store) -> dict[str, Delivery]:
    due = hooks.due(limit=10, per_key=10)
    return {json.loads(d.payload)["data"]["request_id"]: d for d in hooks.lease([d.id for d in due], owner="p",
                                                                                   seconds=60)}  # fmt: skip


def test_each_event_body_is_the_documented_one(env: tuple[Store, Store, Store, Clock, int]) -> None:
    credits, tasks, hooks, _clock, key = env
    done = _submit(credits, key, "t-done", seed=11)
    done.capture(deliver=completion("t-done", images=[b"a", b"b"], inference_time=1.234567, steps=4,
                                              ttl=TTL))  # fmt: skip
    _submit(credits, key, "t-failed", seed=12).fail(also=failure("t-failed", error="it broke", ttl=TTL))
    _submit(credits, key, "t-cancelled", seed=13)
    tasks.cancel(task_id="t-cancelled", key_id=key, ttl=TTL)
    assert hooks.enqueue_finished() == 3
    assert hooks.enqueue_finished() == 0  # once each
    bodies = {task: json.loads(d.payload) for task, d in _leased(hooks).items()}
    assert bodies["t-done"] == {
        "type": "task.completed", "timestamp": "2030-01-02T03:04:05Z",
        "data": {"request_id": "t-done", "status": "COMPLETED", "seed": 11,
                 "output": [f"{BASE}/v2/requests/t-done/images/0", f"{BASE}/v2/requests/t-done/images/1"],
                 "metrics": {"inference_time": 1.2346}, "response_url": f"{BASE}/v2/requests/t-done"},
    }  # fmt: skip
    assert bodies["t-failed"] == {
        "type": "task.failed", "timestamp": "2030-01-02T03:04:05Z",
        "data": {"request_id": "t-failed", "status": "FAILED", "seed": 12, "error": "it broke",
                 "response_url": f"{BASE}/v2/requests/t-failed"},
    }  # fmt: skip
    cancelled = bodies["t-cancelled"]
    assert (cancelled["type"], cancelled["data"]["status"], cancelled["data"]["seed"]) == (
        "task.cancelled", "CANCELLED", 13)  # fmt: skip
    assert cancelled["data"]["error"] == "cancelled; nothing was charged"


def test_a_failed_attempt_is_retried_after_the_first_delay_unless_given_up(
    env: tuple[Store, Store, Store, Clock, int],
) -> None:
    credits, _tasks, hooks, clock, key = env
    for task in ("t1", "t2"):
        _submit(credits, key, task).fail(also=failure(task, error="x", ttl=TTL))
    hooks.enqueue_finished()
    leased = _leased(hooks)
    assert hooks.record(leased["t1"], status_code=500, error=None, duration_ms=1.0) == PENDING
    assert hooks.record(leased["t2"], status_code=None, error="no route", duration_ms=1.0, give_up=True) == GAVE_UP
    assert hooks.deliveries(task_id="t1")[0][1:] == (PENDING, 1)
    assert hooks.due(limit=10, per_key=10) == []  # t1 waits for its first delay, t2 is over
    clock.now += timedelta(seconds=RETRY_DELAYS_S[0])
    assert [d.url for d in hooks.due(limit=10, per_key=10)] == ["http://hook.example/t1"]


def test_retry_now_makes_only_that_tasks_pending_deliveries_due(
    env: tuple[Store, Store, Store, Clock, int],
) -> None:
    credits, _tasks, hooks, clock, key = env
    for task in ("t1", "t2", "t3"):
        _submit(credits, key, task).fail(also=failure(task, error="x", ttl=TTL))
    hooks.enqueue_finished()
    leased = _leased(hooks)
    for task in ("t1", "t2"):
        hooks.record(leased[task], status_code=503, error=None, duration_ms=1.0)  # both wait 5 s
    hooks.record(leased["t3"], status_code=200, error=None, duration_ms=1.0)  # delivered
    clock.now += timedelta(seconds=1)
    hooks.retry_now(task_id="t1")
    assert [d.url for d in hooks.due(limit=10, per_key=10)] == ["http://hook.example/t1"]
    hooks.retry_now(task_id="t3")  # a delivered one stays delivered
    assert [s for _, s, _ in hooks.deliveries(task_id="t3")] == ["delivered"]
    assert len(hooks.due(limit=10, per_key=10)) == 1


@pytest.mark.parametrize(("code", "state"), [(199, PENDING), (200, "delivered"), (201, "delivered"),
                                             (299, "delivered"), (300, PENDING)])  # fmt: skip
def test_only_a_2xx_answer_delivers(
    env: tuple[Store, Store, Store, Clock, int], code: int, state: str
) -> None:
    credits, _tasks, hooks, _clock, key = env
    _submit(credits, key, "t").fail(also=failure("t", error="x", ttl=TTL))
    hooks.enqueue_finished()
    assert hooks.record(_leased(hooks)["t"], status_code=code, error=None, duration_ms=1.0) == state


def test_an_attempt_whose_lease_was_lost_changes_nothing(
    env: tuple[Store, Store, Store, Clock, int],
) -> None:
    credits, _tasks, hooks, clock, key = env
    _submit(credits, key, "t").fail(also=failure("t", error="x", ttl=TTL))
    hooks.enqueue_finished()
    first = _leased(hooks)["t"]
    clock.now += timedelta(seconds=61)  # the lease ran out: another process takes the delivery over
    (second,) = hooks.lease([first.id], owner="q", seconds=60)
    hooks.record(first, status_code=200, error=None, duration_ms=1.0)  # the late answer of the first lease
    assert hooks.deliveries(task_id="t")[0][1:] == (PENDING, 0)
    assert hooks.record(second, status_code=200, error=None, duration_ms=1.0) == "delivered"
    hooks.record(second, status_code=500, error=None, duration_ms=1.0)  # a delivered one stays delivered
    assert hooks.deliveries(task_id="t")[0][1:] == ("delivered", 1)
    assert [code for _, code, _ in hooks.attempts(delivery_id=first.id)] == [200, 200, 500]


def test_a_delivery_is_made_due_at_once_by_the_ledgers_clock(env: tuple[Store, Store, Store, Clock, int]) -> None:
    """Its times are the ledger's clock (which tests and a replayed outbox set), not the wall clock: a clock that
    reads earlier than the wall still finds it due now."""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from sd3serve.ledger.schema import WebhookDelivery

    credits, _tasks, hooks, clock, key = env
    clock.now = datetime(2020, 5, 6, 7, 8, 9, tzinfo=UTC)
    _submit(credits, key, "t").fail(also=failure("t", error="x", ttl=TTL))
    assert hooks.enqueue_finished() == 1
    assert [d.url for d in hooks.due(limit=10, per_key=10)] == ["http://hook.example/t"]
    with Session(credits.engine) as s:
        made, due = s.execute(select(WebhookDelivery.created_at, WebhookDelivery.next_attempt_at)).one()
    assert made.replace(tzinfo=UTC) == due.replace(tzinfo=UTC) == clock.now
