"""v2 tasks on SQLite and PostgreSQL: created with their hold, completed with their charge, failed with their
refund, each in one transaction; a dead owner's tasks and holds are settled by another process."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from helpers.ledger import Store, completion, creation, failure, sharing
from sd3serve.errors import InsufficientCredits, NotFound, ReservationLost
from sd3serve.ledger import Reservation
from sd3serve.ledger.recovery import DIED_MESSAGE
from sd3serve.ledger.schema import Hold, Instance

TTL = timedelta(hours=1)


def _task(
    credits: Store, task_id: str, amount: int = 2, *, owner: str = "me", key_id: int | None = None
) -> tuple[int, Reservation]:
    if key_id is None:
        key_id = credits.create_key(credits=5)[0].id
    create = creation(task_id=task_id, key_id=key_id, seed=1, base64=False, media_type="image/png",
                                request_json="{}", owner=owner)  # fmt: skip
    return key_id, credits.reserve(key_id=key_id, credits=Decimal(amount), request_id=task_id, owner=owner,
                                   with_hold=create)  # fmt: skip


def _complete(task_id: str, images: list[bytes], ttl: timedelta = TTL) -> object:
    return completion(task_id, images=images, inference_time=0.5, steps=4, ttl=ttl)


def test_complete_charges_once(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key_id, res = _task(credits, "t1")
    assert tasks.get(task_id="t1", key_id=key_id).status == "QUEUED"
    tasks.set_progress("t1", step=1, total=4)
    view = tasks.get(task_id="t1", key_id=key_id)
    assert (view.status, view.progress_step, view.progress_total) == ("PROCESSING", 1, 4)
    res.capture(deliver=_complete("t1", [b"a", b"bb"]))  # type: ignore[arg-type]
    view = tasks.get(task_id="t1", key_id=key_id)
    assert (view.status, view.image_count, view.progress_step) == ("COMPLETED", 2, 4)
    assert tasks.image(task_id="t1", key_id=key_id, index=1) == (b"bb", "image/png")
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (3, 2)
    res.fail(also=failure("t1", error="late", ttl=TTL))  # a finished task stays so
    assert tasks.get(task_id="t1", key_id=key_id).status == "COMPLETED"
    assert credits.get_key(key_id=key_id).credits == 3


def test_fail_refunds(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key_id, res = _task(credits, "t2")
    res.fail(also=failure("t2", error="boom", ttl=TTL))
    view = tasks.get(task_id="t2", key_id=key_id)
    assert (view.status, view.error) == ("FAILED", "boom")
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (5, 0)


def test_no_task_without_its_hold(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key_id, _ = _task(credits, "t4", amount=5)
    with pytest.raises(InsufficientCredits):
        _task(credits, "t5", amount=1, key_id=key_id)
    with pytest.raises(NotFound):
        tasks.get(task_id="t5", key_id=key_id)


def test_foreign_and_expired(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key_id, res = _task(credits, "t3")
    other, _ = credits.create_key(credits=1)
    with pytest.raises(NotFound):
        tasks.get(task_id="t3", key_id=other.id)
    with pytest.raises(NotFound):
        tasks.image(task_id="t3", key_id=key_id, index=0)
    res.capture(deliver=_complete("t3", [b"x"], ttl=timedelta(seconds=-1)))  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        tasks.image(task_id="t3", key_id=other.id, index=0)
    assert tasks.delete_expired() == 1
    with pytest.raises(NotFound):
        tasks.get(task_id="t3", key_id=key_id)


def _age(credits: Store, instance_id: str, seconds: float) -> None:
    from datetime import UTC, datetime

    with Session(credits.engine) as s, s.begin():
        s.execute(
            update(Instance)
            .where(Instance.id == instance_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds))
        )


def test_a_paused_process_presumed_dead_delivers_nothing_unpaid(stores: tuple[Store, Store]) -> None:
    """A settles B (heartbeat stale); B resumes and completes its task: refused, no images, nothing charged."""
    credits, tasks = stores
    a, b = sharing(credits), sharing(credits)
    a.register()
    b.register()
    key_id, res = _task(credits, "paused", owner=b.instance_id)
    sync = credits.reserve(key_id=key_id, credits=Decimal(1), request_id="v1", owner=b.instance_id)
    _age(credits, b.instance_id, 60)
    assert a.settle_dead(dead_after=timedelta(seconds=30)) == 1
    assert credits.balance(key_id=key_id) == 5
    view = tasks.get(task_id="paused", key_id=key_id)
    assert (view.status, view.error) == ("FAILED", DIED_MESSAGE)

    with pytest.raises(ReservationLost):
        res.capture(deliver=_complete("paused", [b"late"]))  # type: ignore[arg-type]
    with pytest.raises(ReservationLost):
        sync.capture()
    view = tasks.get(task_id="paused", key_id=key_id)
    assert (view.status, view.image_count) == ("FAILED", 0)
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (5, 0)
    # B learns it at its next heartbeat and goes on under a new id.
    old = b.instance_id
    assert b.heartbeat() is False and b.instance_id != old
    assert b.heartbeat() is True and a.heartbeat() is True


def test_live_peers_keep_their_old_holds_and_orphans_are_returned(stores: tuple[Store, Store]) -> None:
    """Only holds of dead or unknown owners go back; a live peer's hold stays however old it is."""
    from datetime import UTC, datetime

    credits, tasks = stores
    a, b = sharing(credits), sharing(credits)
    a.register()
    b.register()
    key_id, _ = _task(credits, "live", owner=b.instance_id)
    credits.reserve(key_id=key_id, credits=Decimal(1), request_id="orphan", owner="gone-without-a-trace")
    assert credits.balance(key_id=key_id) == 2
    assert a.settle_dead(dead_after=timedelta(seconds=30)) == 0  # the orphan is too recent to judge
    with Session(credits.engine) as s, s.begin():
        s.execute(update(Hold).values(created_at=datetime.now(UTC) - timedelta(hours=2)))
    assert a.settle_dead(dead_after=timedelta(seconds=30)) == 1  # the orphan only
    assert credits.balance(key_id=key_id) == 3
    assert tasks.get(task_id="live", key_id=key_id).status == "QUEUED"


def test_cancel_refunds_at_once_and_a_late_completion_delivers_nothing(stores: tuple[Store, Store]) -> None:
    credits, tasks = stores
    key_id, res = _task(credits, "c1")
    other = credits.create_key(credits=1)[0].id
    with pytest.raises(NotFound):
        tasks.cancel(task_id="c1", key_id=other, ttl=TTL)
    view, cancelled = tasks.cancel(task_id="c1", key_id=key_id, ttl=TTL)
    assert (view.status, cancelled, credits.balance(key_id=key_id)) == ("CANCELLED", True, 5)
    assert tasks.cancelled_among(["c1", "nope"]) == ["c1"]
    with pytest.raises(ReservationLost):
        res.capture(deliver=_complete("c1", [b"late"]))  # type: ignore[arg-type]
    view, cancelled = tasks.cancel(task_id="c1", key_id=key_id, ttl=TTL)
    assert (view.status, view.image_count, cancelled) == ("CANCELLED", 0, False)
    assert (credits.get_key(key_id=key_id).credits, credits.get_key(key_id=key_id).spent) == (5, 0)


def test_settling_a_dead_process_touches_only_its_unfinished_work(stores: tuple[Store, Store]) -> None:
    """B dies with a finished task and a running one; A lives. Only B's running task fails and is refunded, and
    A's work is untouched although A's heartbeat is fresh (the re-check inside the transaction is B's)."""
    credits, tasks = stores
    a, b = sharing(credits), sharing(credits)
    a.register()
    b.register()
    key_id, finished = _task(credits, "b-done", owner=b.instance_id)
    finished.capture(deliver=_complete("b-done", [b"img"]))  # type: ignore[arg-type]
    _task(credits, "b-running", owner=b.instance_id, key_id=key_id)
    _task(credits, "a-running", owner=a.instance_id, key_id=key_id, amount=1)
    _age(credits, b.instance_id, 60)
    assert a.settle_dead(dead_after=timedelta(seconds=30)) == 1
    assert tasks.get(task_id="b-done", key_id=key_id).status == "COMPLETED"  # finished work stays finished
    assert tasks.get(task_id="b-done", key_id=key_id).image_count == 1
    failed = tasks.get(task_id="b-running", key_id=key_id)
    assert (failed.status, failed.error) == ("FAILED", DIED_MESSAGE)
    assert tasks.get(task_id="a-running", key_id=key_id).status == "QUEUED"
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (5 - 2 - 1, 2)  # B's running hold returned; A's still held
    assert b.heartbeat() is False and a.heartbeat() is True
