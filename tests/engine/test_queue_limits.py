"""The queue's two refusals, by exact type: full is ``Overloaded`` (refused at once), a missed deadline is its
subclass ``QueueTimeout``. ``pytest.raises(Overloaded)`` alone accepts either, so each test checks ``type(e)``."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gated import GatedEngine
from helpers.engines import held, started
from helpers.jobs import make_job
from sd3serve.engine.loading import LoadedModel
from sd3serve.errors import Overloaded, QueueTimeout
from sd3serve.settings import Settings

JOB = make_job()  # fmt: skip
OTHER = dataclasses.replace(JOB, steps=2)  # cannot share a batch with JOB


async def _with_running_job(engine: GatedEngine, *, started: bool = False) -> asyncio.Task[object]:
    """Start the engine with its gate shut and one job taken by the worker: what comes next waits in the queue."""
    if not started:
        await engine.start()
    return await held(engine, JOB)


@pytest.mark.parametrize("max_queue", [1, 3])
@pytest.mark.anyio
async def test_the_request_that_finds_the_queue_full_gets_exactly_overloaded(
    tiny_model: LoadedModel, max_queue: int
) -> None:
    engine = GatedEngine(Settings(device="cpu", max_queue=max_queue, batch_wait_ms=0), tiny_model)
    running = await _with_running_job(engine)
    try:
        queued = [asyncio.create_task(engine.generate(OTHER, request_id=f"q{i}")) for i in range(max_queue)]
        await asyncio.sleep(0)
        assert engine.queue_depth == max_queue  # every place up to the limit was taken
        assert not any(q.done() for q in queued)
        # refused at once, before waiting for anything: a request let in would wait for the shut gate
        rejected = asyncio.create_task(engine.generate(OTHER, request_id="one-too-many"))
        await asyncio.sleep(0)
        assert rejected.done(), "the request past the limit was queued"
        with pytest.raises(Overloaded) as e:
            rejected.result()
        assert type(e.value) is Overloaded, type(e.value)
        assert str(max_queue) in str(e.value) and e.value.retry_after_s >= 1
        assert engine.queue_depth == max_queue  # the refused request took no place
        engine.gate.set()
        await running
        await asyncio.gather(*queued)  # the accepted ones all run
    finally:
        engine.gate.set()
        await engine.close()


@pytest.mark.anyio
async def test_a_request_past_its_deadline_gets_exactly_queue_timeout(tiny_model: LoadedModel) -> None:
    engine = GatedEngine(Settings(device="cpu", max_queue=4, batch_wait_ms=0), tiny_model)
    running = await _with_running_job(engine)
    # deadline 1 µs from now on: whatever waits while the gate is shut is past it when the worker looks again
    engine.settings.queue_timeout_s = 1e-6
    try:
        waiting = asyncio.create_task(engine.generate(OTHER, request_id="waiting"))
        await asyncio.sleep(0)
        assert engine.queue_depth == 1
        engine.gate.set()
        await running
        with pytest.raises(QueueTimeout) as e:
            await waiting
        assert type(e.value) is QueueTimeout and isinstance(e.value, Overloaded)
        assert engine.queue_depth == 0
    finally:
        engine.gate.set()
        await engine.close()


@pytest.mark.anyio
async def test_retry_after_is_at_least_a_second_after_fast_batches(tiny_model: LoadedModel) -> None:
    """Retry-After is a whole number of seconds, never 0 (which tells clients to retry at once), however fast the
    recent batches were."""
    settings = Settings(device="cpu", max_queue=1, batch_wait_ms=0, max_batch_images=1)
    async with started(GatedEngine(settings, tiny_model)) as engine:
        for i in range(20):  # the running estimate of a batch's duration falls to about one tiny batch
            await engine.generate(dataclasses.replace(JOB, seed=i), request_id=f"fast{i}")
        running = await _with_running_job(engine, started=True)
        waiting = asyncio.create_task(engine.generate(OTHER, request_id="waiting"))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded) as e:
            await engine.generate(OTHER, request_id="refused")
        assert type(e.value) is Overloaded and e.value.retry_after_s >= 1, e.value.retry_after_s
        engine.gate.set()
        await asyncio.gather(running, waiting)