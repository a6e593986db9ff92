"""The v2 dispatch of the Ray deployment without Ray running: the runner takes a task over only while its
submitter still holds it; a failed call fails the task and returns the hold once (never a delivered one's); a
router that refuses (backpressure) is tried again while the task waits QUEUED."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select

from sd3serve.api.schemas import Txt2ImgRequest
from sd3serve.ledger import Reservation
from sd3serve.ledger.schema import Hold, Task

pytest.importorskip("ray")
from ray.serve.exceptions import BackPressureError

from helpers.ledger import Store, completion, creation, failure, open_store
from sd3serve import scaleout_tasks
from sd3serve.scaleout_tasks import LOST, HandleDispatch

REQ = Txt2ImgRequest.model_validate({"prompt": "a red circle", "width": 64, "height": 64, "steps": 1})


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    s.create_schema()
    return s


def accepted(store: Store, *, credits: int = 3, task_id: str = "t1", owner: str = "submitter") -> tuple[
    int, Reservation
]:  # fmt: skip
    """A key with ``credits`` and one accepted task of 1 credit owned by ``owner``: (key id, its reservation)."""
    key = store.create_key(credits=credits)[0]
    create = creation(task_id=task_id, key_id=key.id, seed=1, request_json=REQ.model_dump_json(), owner=owner)
    return key.id, store.reserve(key_id=key.id, credits=1, request_id=task_id, owner=owner, with_hold=create)


def owners(store: Store, task_id: str = "t1") -> tuple[str | None, str | None]:
    with store.engine.connect() as c:
        task = c.execute(select(Task.owner, Task.hold_id).where(Task.id == task_id)).one()
        hold = c.execute(select(Hold.owner).where(Hold.id == task.hold_id)).scalar_one_or_none()
    return task.owner, hold


def test_the_runner_takes_over_only_what_its_submitter_still_holds(store: Store) -> None:
    _, reservation = accepted(store)
    assert not store.hand_over("t1", hold=reservation.hold, owner="someone-else", new_owner="runner")
    assert owners(store) == ("submitter", "submitter")
    assert store.hand_over("t1", hold=reservation.hold, owner="submitter", new_owner="runner")
    assert owners(store) == ("runner", "runner")
    assert not store.hand_over("t1", hold=reservation.hold, owner="submitter", new_owner="other")
    assert store.hand_over("t1", hold=reservation.hold, owner="runner", new_owner="runner")  # itself


def test_a_hold_settled_before_the_runner_came_is_not_run(store: Store) -> None:
    key_id, reservation = accepted(store)
    reservation.fail(also=failure("t1", error="presumed dead", ttl=timedelta(days=1)))
    assert not store.hand_over("t1", hold=reservation.hold, owner="submitter", new_owner="runner")
    assert store.get_key(key_id=key_id).credits == 3


class Handle:
    """A stand-in for the deployment handle: each call raises the next of ``outcomes`` (None: returns)."""

    def __init__(self, *outcomes: BaseException | None) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0
        self.run_task = SimpleNamespace(remote=self.remote)

    async def remote(self, *args: Any) -> None:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if outcome is not None:
            raise outcome


def dispatch(handle: Handle, store: Store) -> HandleDispatch:
    service: Any = SimpleNamespace(settings=SimpleNamespace(task_ttl_s=60), ledger=store.ledger)
    return HandleDispatch(lambda: handle, service, lambda: "submitter")


def test_a_failed_call_fails_the_task_and_returns_its_hold(store: Store) -> None:
    key_id, reservation = accepted(store)
    asyncio.run(dispatch(Handle(RuntimeError("the replica died")), store)(reservation, REQ.order("v2"), "t1"))
    view = store.get(task_id="t1", key_id=key_id)
    assert view.status == "FAILED" and view.error == LOST
    info = store.get_key(key_id=key_id)
    assert info.credits == 3 and info.spent == 0


def test_a_failed_call_after_delivery_charges_once_and_stays_completed(store: Store) -> None:
    key_id, reservation = accepted(store)
    done = completion("t1", images=[b"jpeg"], inference_time=1.0, steps=1, ttl=timedelta(days=1))
    Reservation(store.ledger, reservation.hold).capture(deliver=done)  # the runner delivered, then its answer was lost
    asyncio.run(dispatch(Handle(RuntimeError("lost answer")), store)(reservation, REQ.order("v2"), "t1"))
    assert store.get(task_id="t1", key_id=key_id).status == "COMPLETED"
    info = store.get_key(key_id=key_id)
    assert info.credits == 2 and info.spent == 1


def test_backpressure_is_tried_again_while_the_task_waits(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scaleout_tasks, "BACKPRESSURE_RETRY_S", 0)
    key_id, reservation = accepted(store)
    handle = Handle(BackPressureError(num_queued_requests=1, max_queued_requests=1), None)
    asyncio.run(dispatch(handle, store)(reservation, REQ.order("v2"), "t1"))
    assert handle.calls == 2
    assert store.get(task_id="t1", key_id=key_id).status == "QUEUED"  # the runner has it
    assert store.get_key(key_id=key_id).credits == 2  # still held
