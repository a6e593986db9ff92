"""v2 tasks on SQLite and PostgreSQL: completion and charge commit together, as do failure and refund."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from decimal import Decimal

import pytest

from sd3serve.errors import NotFound
from sd3serve.store.credits import CreditStore
from sd3serve.store.tasks import TaskStore

TTL = timedelta(hours=1)


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[CreditStore, TaskStore]]:
    credits = CreditStore(store_url)
    credits.create_schema()
    yield credits, TaskStore(credits.engine)
    credits.close()


def _task(credits: CreditStore, tasks: TaskStore, task_id: str, amount: int = 2) -> tuple[int, object]:
    key, _ = credits.create_key(credits=5)
    hold = credits.hold(key_id=key.id, credits=Decimal(amount), request_id=task_id)
    tasks.create(task_id=task_id, key_id=key.id, seed=1, base64=False, media_type="image/png",
                 request_json="{}", hold=hold, owner="me")  # fmt: skip
    return key.id, hold


def test_complete_charges_once(stores: tuple[CreditStore, TaskStore]) -> None:
    credits, tasks = stores
    key_id, hold = _task(credits, tasks, "t1")
    assert tasks.get(task_id="t1", key_id=key_id).status == "QUEUED"
    tasks.set_progress("t1", step=1, total=4)
    view = tasks.get(task_id="t1", key_id=key_id)
    assert (view.status, view.progress_step, view.progress_total) == ("PROCESSING", 1, 4)
    tasks.complete("t1", images=[b"a", b"bb"], inference_time=0.5, hold=hold, ttl=TTL)  # type: ignore[arg-type]
    view = tasks.get(task_id="t1", key_id=key_id)
    assert (view.status, view.image_count, view.progress_step) == ("COMPLETED", 2, 4)
    assert tasks.image(task_id="t1", key_id=key_id, index=1) == (b"bb", "image/png")
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (3, 2)
    tasks.fail("t1", error="late", hold=hold, ttl=TTL)  # type: ignore[arg-type]  # a finished task stays so
    assert tasks.get(task_id="t1", key_id=key_id).status == "COMPLETED"
    assert credits.get_key(key_id=key_id).credits == 3


def test_fail_refunds(stores: tuple[CreditStore, TaskStore]) -> None:
    credits, tasks = stores
    key_id, hold = _task(credits, tasks, "t2")
    tasks.fail("t2", error="boom", hold=hold, ttl=TTL)  # type: ignore[arg-type]
    view = tasks.get(task_id="t2", key_id=key_id)
    assert (view.status, view.error) == ("FAILED", "boom")
    key = credits.get_key(key_id=key_id)
    assert (key.credits, key.spent) == (5, 0)


def test_foreign_and_expired(stores: tuple[CreditStore, TaskStore]) -> None:
    credits, tasks = stores
    key_id, hold = _task(credits, tasks, "t3")
    other, _ = credits.create_key(credits=1)
    with pytest.raises(NotFound):
        tasks.get(task_id="t3", key_id=other.id)
    with pytest.raises(NotFound):
        tasks.image(task_id="t3", key_id=key_id, index=0)
    tasks.complete("t3", images=[b"x"], inference_time=0.1, hold=hold, ttl=timedelta(seconds=-1))  # type: ignore[arg-type]
    assert tasks.delete_expired() == 1
    with pytest.raises(NotFound):
        tasks.get(task_id="t3", key_id=key_id)
