"""The generation service's promises (service/generation.py, docs/serving.md), on the service itself with an engine
the test holds: shutdown lets accepted v2 tasks finish within the grace and fails (refunds) the rest, returning
normally; a task's outcome is written again while the database is away, backing off 0.2 s, 0.4 s, ... up to 5 s;
the stored-results budget refuses at exactly the budget and not a byte below, and a synchronous request with an
Idempotency-Key is told it can go without one; a v2 webhook's result URLs start with the server's base URL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from helpers.jobs import make_job
from helpers.ledger import Store, completion, creation, open_store
from live_server import SMALL, serving
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.errors import StorageFull
from sd3serve.imaging import ImageFormat
from sd3serve.ledger import KeyInfo
from sd3serve.ledger.schema import TaskWebhook
from sd3serve.service import generation
from sd3serve.service.generation import GenerationService
from sd3serve.service.metrics import Metrics
from sd3serve.service.order import Order, Output
from sd3serve.settings import Settings
from stub_engine import StubEngine

pytestmark = pytest.mark.anyio


class HeldEngine(StubEngine):
    """A request waits until the test sets its event (``release``); ``started`` lists the requests begun."""

    def __init__(self) -> None:
        self.release: dict[str, asyncio.Event] = {}
        self.started: list[str] = []

    def event(self, request_id: str) -> asyncio.Event:
        return self.release.setdefault(request_id, asyncio.Event())

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        self.started.append(request_id)
        await self.event(request_id).wait()
        return await super().generate(job, request_id=request_id, progress=progress)


ORDER = Order(job=make_job(width=64, height=64, steps=2), output=Output(ImageFormat.png, 90), request="{}",
              route="v2")  # fmt: skip


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = open_store(f"sqlite:///{tmp_path / 'ledger.db'}")
    s.create_schema()
    yield s
    s.close()


def service_for(store: Store, engine: StubEngine, tmp_path: Path, **settings: Any) -> GenerationService:
    values: dict[str, Any] = {"data_dir": tmp_path, "device": "cpu"} | settings
    return GenerationService(model_engine=engine, ledger=store.ledger, settings=Settings(**values), metrics=Metrics())


def new_key(store: Store, credits: int = 5) -> KeyInfo:
    key: KeyInfo = store.create_key(credits=credits)[0]
    return key


async def until(condition: Any) -> None:
    for _ in range(3000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_drain_lets_tasks_finish_within_the_grace_and_fails_the_rest_refunded(
    store: Store, tmp_path: Path
) -> None:
    engine = HeldEngine()
    service = service_for(store, engine, tmp_path)
    key = new_key(store)
    await service.submit(key, ORDER, request_id="quick")
    await service.submit(key, ORDER, request_id="slow")
    await until(lambda: len(engine.started) == 2)
    assert store.balance(key_id=key.id) == 3  # a credit held for each

    async def finish_quick_soon() -> None:
        await asyncio.sleep(0.05)
        engine.event("quick").set()

    helper = asyncio.create_task(finish_quick_soon())
    await service.drain(0.5)  # returns normally, whatever the tasks it stopped raised
    await helper
    quick, slow = (store.get(task_id=t, key_id=key.id) for t in ("quick", "slow"))
    assert quick.status == "COMPLETED"
    assert slow.status == "FAILED" and slow.error is not None and "shut down" in slow.error
    assert store.balance(key_id=key.id) == 4  # the quick task paid, the stopped one refunded


class AsyncioSpy:
    """The service module's ``asyncio`` with ``sleep`` recorded (and not waited for)."""

    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self._sleep = asyncio.sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        await self._sleep(0)


async def test_a_result_is_written_again_while_the_database_is_away_backing_off_to_5_s(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = AsyncioSpy()
    monkeypatch.setattr(generation, "asyncio", spy)
    service = service_for(store, StubEngine(), tmp_path)
    calls = store.ledger.call
    failures = 7

    async def away_for_a_while(fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if getattr(fn, "__name__", "") == "capture" and failures:
            failures -= 1
            raise DBAPIError("UPDATE holds", {}, ConnectionError("database away"))
        return await calls(fn, *args, **kwargs)

    monkeypatch.setattr(store.ledger, "call", away_for_a_while)
    key = new_key(store)
    await service.submit(key, ORDER, request_id="t")
    await until(lambda: store.get(task_id="t", key_id=key.id).status == "COMPLETED")
    backoff = [s for s in spy.sleeps if s != generation.PROGRESS_WRITE_INTERVAL_S]
    assert backoff == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert store.balance(key_id=key.id) == 4  # charged once


def _stored(store: Store, key: KeyInfo, nbytes: int) -> None:
    """A completed task of ``key`` holding one image of ``nbytes`` bytes."""
    reservation = store.reserve(key_id=key.id, credits=Decimal(1), request_id="stored",
                                with_hold=creation(task_id="stored", key_id=key.id, seed=1))  # fmt: skip
    reservation.capture(deliver=completion("stored", images=[bytes(nbytes)]))


@pytest.mark.parametrize(("budget", "accepted"), [(1000, False), (1001, True)], ids=["at the budget", "under it"])
async def test_the_storage_budget_refuses_at_exactly_the_budget(
    store: Store, tmp_path: Path, budget: int, accepted: bool
) -> None:
    key = new_key(store)
    _stored(store, key, 1000)
    service = service_for(store, StubEngine(), tmp_path, storage_per_key_mb=budget / 2**20, storage_total_mb=0)
    if accepted:
        await service.submit(key, ORDER, request_id="next")
        await until(lambda: store.get(task_id="next", key_id=key.id).status == "COMPLETED")
        return
    with pytest.raises(StorageFull, match="or use the synchronous v1 endpoint without an Idempotency-Key"):
        await service.submit(key, ORDER, request_id="next")
    with pytest.raises(StorageFull, match=r"or send this request without an Idempotency-Key \(its answer"):
        await service.generate(key, ORDER, request_id="v1", disconnected=asyncio.Event().wait, idempotency_key="k")
    assert store.balance(key_id=key.id) == 4  # refusals charge nothing


@pytest.mark.anyio
async def test_a_webhooks_result_urls_start_with_the_servers_base_url(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=True)
    with serving(settings, engine=StubEngine()) as server:
        key = server.new_key(5)
        headers = {"x-api-key": key}
        with server.client() as c:
            assert c.post("/v1/webhook-secret", headers=headers).status_code == 200
            body = {**SMALL, "webhook_url": "http://127.0.0.1:9/hook"}
            r = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=body, headers=headers)
            assert r.status_code == 200, r.text
        with Session(server.store.engine) as s:
            base = s.scalar(select(TaskWebhook.base_url).where(TaskWebhook.task_id == r.json()["request_id"]))
    assert base == server.url


async def test_the_generation_time_is_the_time_the_engine_took(store: Store, tmp_path: Path) -> None:
    """``x-generation-time``: the seconds from the engine's start to its images, within the call's own span."""
    engine = HeldEngine()
    service = service_for(store, engine, tmp_path)
    key = new_key(store)
    loop = asyncio.get_running_loop()
    engine.event("v1")
    loop.call_later(0.05, engine.event("v1").set)
    t0 = time.perf_counter()
    delivery = await service.generate(key, ORDER, request_id="v1", disconnected=asyncio.Event().wait)
    wall = time.perf_counter() - t0
    assert 0 < delivery.seconds <= wall  # (a sum of two clock readings would be far past the span)


@pytest.mark.parametrize("limit", [1, 2])
async def test_the_rate_limit_admits_exactly_its_number_per_minute(store: Store, tmp_path: Path, limit: int) -> None:
    from sd3serve.errors import RateLimited
    from sd3serve.service.accounts import Accounts

    accounts = Accounts(store.ledger, Settings(data_dir=tmp_path, device="cpu", rate_limit_per_minute=limit))
    key, other = new_key(store), new_key(store)
    for _ in range(limit):
        await accounts.count_generation(key)
    with pytest.raises(RateLimited):
        await accounts.count_generation(key)
    await accounts.count_generation(other)  # a key of its own
