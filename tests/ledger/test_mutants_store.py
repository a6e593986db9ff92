"""Store contracts that bench/mutate.py showed untested: a failure never overwrites a settled task, a completion
never revives one, and giving an idempotency claim back never drops an answer that was charged."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from helpers.ledger import Store, answered, completion, creation, failure, open_store
from sd3serve.errors import ReservationLost
from sd3serve.ledger import Reservation
from sd3serve.ledger.idempotency import Claim, fingerprint
from sd3serve.ledger.schema import Task

TTL = timedelta(hours=1)


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[Store, Store, Store]]:
    credits = open_store(store_url)
    credits.create_schema()
    yield credits, credits, credits
    credits.close()


def _task(credits: Store, task_id: str) -> tuple[int, Reservation]:
    key_id = credits.create_key(credits=5)[0].id
    create = creation(task_id=task_id, key_id=key_id, seed=1, base64=False, media_type="image/png",
                                request_json="{}", owner="me")  # fmt: skip
    return key_id, credits.reserve(key_id=key_id, credits=Decimal(2), request_id=task_id, owner="me",
                                   with_hold=create)  # fmt: skip


def test_a_run_that_stops_after_its_task_was_cancelled_leaves_it_cancelled(
    stores: tuple[Store, Store, Store],
) -> None:
    """Cancelled through another process, the run here stops and records its failure: the task stays
    CANCELLED (with its message), and the refund happens once."""
    credits, tasks, _ = stores
    key_id, res = _task(credits, "c")
    view, cancelled = tasks.cancel(task_id="c", key_id=key_id, ttl=TTL)
    assert cancelled and view.status == "CANCELLED"
    res.fail(also=failure("c", error="stopped", ttl=TTL))  # what the stopped run does here
    view = tasks.get(task_id="c", key_id=key_id)
    assert (view.status, view.error) == ("CANCELLED", "cancelled; nothing was charged")
    assert (credits.get_key(key_id=key_id).credits, credits.get_key(key_id=key_id).spent) == (5, 0)


def test_a_completed_task_is_not_failed_by_a_late_failure_step(
    stores: tuple[Store, Store, Store],
) -> None:
    credits, tasks, _ = stores
    key_id, res = _task(credits, "done")
    res.capture(deliver=completion("done", images=[b"x"], inference_time=0.1, steps=4, ttl=TTL))
    credits.release(res.hold, also=failure("done", error="late", ttl=TTL))  # hold gone: refunds nothing
    view = tasks.get(task_id="done", key_id=key_id)
    assert (view.status, view.error, view.image_count) == ("COMPLETED", None, 1)
    assert (credits.get_key(key_id=key_id).credits, credits.get_key(key_id=key_id).spent) == (3, 2)


def test_the_completion_step_refuses_a_task_that_no_longer_runs(
    stores: tuple[Store, Store, Store],
) -> None:
    """The completion checks the task itself, not only its hold: a task settled elsewhere (here FAILED behind
    the store's back, its hold still there) is not completed, and the charge rolls back with it."""
    credits, tasks, _ = stores
    key_id, res = _task(credits, "gone")
    with Session(credits.engine) as s, s.begin():
        s.execute(update(Task).where(Task.id == "gone").values(status="FAILED", error="settled elsewhere"))
    with pytest.raises(ReservationLost):
        res.capture(deliver=completion("gone", images=[b"x"], inference_time=0.1, steps=4, ttl=TTL))
    view = tasks.get(task_id="gone", key_id=key_id)
    assert (view.status, view.image_count) == ("FAILED", 0)
    assert credits.get_key(key_id=key_id).spent == 0


def test_abandoning_an_answered_claim_keeps_the_answer(stores: tuple[Store, Store, Store]) -> None:
    """``abandon`` gives back only a claim with no answer: once a request was charged and answered, a late
    abandon (a failure after the capture) must not let a retry run, and be charged, again."""
    credits, _, idem = stores
    key_id = credits.create_key(credits=5)[0].id
    body = fingerprint("v1", "{}")
    assert idem.begin(key_id=key_id, idem_key="k", fingerprint=body) is None
    res = credits.reserve(key_id=key_id, credits=Decimal(1), request_id="r", owner="me")
    res.capture(deliver=answered(Claim(key_id, "k"), b"the answer"))
    idem.abandon(Claim(key_id, "k"))
    assert idem.begin(key_id=key_id, idem_key="k", fingerprint=body) == b"the answer"
