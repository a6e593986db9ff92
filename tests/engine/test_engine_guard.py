"""The engine's worker survives failures, stops jobs nobody waits for, and fails queued jobs at their deadline."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import numpy as np
import pytest

from gated import CountingGate, GatedEngine
from helpers.engines import held, started
from helpers.jobs import make_job
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.engine.protocol import Aborted
from sd3serve.errors import QueueTimeout
from sd3serve.settings import Settings

JOB = make_job(negative_prompt="blurry", steps=6)  # fmt: skip


class Sabotaged(BatchingEngine):
    """The real engine whose pipeline misbehaves once, in a chosen way, for the first batch."""

    def __init__(self, *args: Any, fault: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fault: str | None = fault

    @property
    def pipeline(self) -> SD3Pipeline:
        real, engine = super().pipeline, self

        class Faulty:
            prompt_cache = real.prompt_cache

            def generate_many(self, jobs: list[GenerationJob], **kwargs: Any) -> Any:
                fault, engine.fault = engine.fault, None
                if fault == "raises":
                    raise RuntimeError("CUDA error: an illegal memory access (simulated)")
                results = real.generate_many(jobs, **kwargs)
                return results[:-1] if fault == "short" else results

        return Faulty()  # type: ignore[return-value]


@pytest.mark.parametrize("fault", ["raises", "short", "observer"])
@pytest.mark.anyio
async def test_a_failing_batch_fails_only_its_requests(tiny_model: LoadedModel, fault: str) -> None:
    def observer(images: int, seconds: float) -> None:
        if fault == "observer":
            raise ValueError("a metrics bug")

    settings = Settings(device="cpu", batch_wait_ms=0)
    async with started(Sabotaged(settings, tiny_model, fault=fault, on_batch=observer)) as engine:
        first = engine.generate(dataclasses.replace(JOB, steps=2), request_id="first")
        if fault == "observer":  # a broken observer costs nothing: the images are delivered
            assert len((await first).images) == 1
        else:
            with pytest.raises(RuntimeError):
                await first
        # The worker is alive: the next batch runs and is right.
        result = await engine.generate(dataclasses.replace(JOB, steps=2, seed=7), request_id="next")
        alone = SD3Pipeline(tiny_model)(dataclasses.replace(JOB, steps=2, seed=7))
        assert np.array_equal(np.asarray(result.images[0]), np.asarray(alone.images[0]))
        await engine.check_health()
        assert engine.stats().failed_batches == (0 if fault == "observer" else 1)


@pytest.mark.anyio
async def test_an_abandoned_job_stops_at_the_next_step_and_its_batch_mates_are_exact(tiny_model: LoadedModel) -> None:
    settings = Settings(device="cpu", batch_wait_ms=2000, max_batch_images=4)
    async with started(CountingGate(settings, tiny_model)) as engine:
        engine.pause_at_step = 2
        engine.gate.clear()
        jobs = {
            "stays": JOB,
            "leaves": dataclasses.replace(JOB, prompt="a blue square", seed=11),
            "pair": dataclasses.replace(JOB, prompt="a green star", seed=20, batch_size=2),
        }
        tasks = {rid: asyncio.create_task(engine.generate(j, request_id=rid)) for rid, j in jobs.items()}
        await asyncio.get_running_loop().run_in_executor(None, engine.paused.wait, 60)
        assert engine.in_flight == 3
        tasks["leaves"].cancel()  # its client went away mid-run
        await asyncio.gather(tasks["leaves"], return_exceptions=True)
        engine.gate.set()
        alone = SD3Pipeline(tiny_model)
        for rid in ("stays", "pair"):
            got = [np.asarray(im) for im in (await tasks[rid]).images]
            expected = [np.asarray(im) for im in alone(jobs[rid]).images]
            assert len(got) == jobs[rid].batch_size
            assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
        assert engine.stats().aborted == 1

        # Alone in its batch, an abandoned job frees the model at the next step.
        engine.steps_seen.clear()
        engine.paused.clear()
        engine.gate.clear()
        lonely = asyncio.create_task(engine.generate(dataclasses.replace(JOB, seed=3), request_id="lonely"))
        await asyncio.get_running_loop().run_in_executor(None, engine.paused.wait, 60)
        await engine.abort("lonely")
        with pytest.raises(Aborted):
            await lonely
        engine.gate.set()
        while engine.in_flight:
            await asyncio.sleep(0.01)
        assert max(engine.steps_seen) <= 3  # paused after step 2 of 6: at most one more model call
        assert engine.stats().batches == 2


@pytest.mark.anyio
async def test_queued_requests_time_out_while_a_long_batch_runs(tiny_model: LoadedModel) -> None:
    async with started(GatedEngine(Settings(device="cpu", batch_wait_ms=0, queue_timeout_s=0.5), tiny_model)) as engine:
        running = await held(engine, JOB, "long")  # "a long batch"
        queued = asyncio.create_task(engine.generate(dataclasses.replace(JOB, steps=3), request_id="q"))
        # Answered at its deadline, while the batch is still held (before: only once it ended).
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(queued, timeout=30)
        assert engine.in_flight == 1 and not running.done()
        engine.gate.set()
        await running


@pytest.mark.anyio
async def test_stats_report_the_queue_and_the_cache(tiny_model: LoadedModel) -> None:
    settings = Settings(device="cpu", batch_wait_ms=0, prompt_cache_mb=1)
    async with started(BatchingEngine(settings, tiny_model)) as engine:
        await engine.generate(dataclasses.replace(JOB, steps=1), request_id="a")
        await engine.generate(dataclasses.replace(JOB, steps=1), request_id="b")
        stats = engine.stats()
        assert (stats.ready, stats.queued, stats.running, stats.batches) == (True, 0, 0, 2)
        assert stats.prompt_cache_hits >= 1 and stats.prompt_cache_entries >= 1 and stats.prompt_cache_bytes > 0


@pytest.mark.anyio
async def test_a_large_request_yields_to_small_ones_between_images(tiny_model: LoadedModel) -> None:
    """max_batch_images 1: a request for 4 images runs one image at a time, and a small request that arrives
    while it runs is served before its remaining images; every image is still what it is alone."""
    order: list[str] = []
    async with started(CountingGate(Settings(device="cpu", batch_wait_ms=0, max_batch_images=1), tiny_model)) as engine:
        engine.pause_at_step = 1
        engine.gate.clear()
        big_job = dataclasses.replace(JOB, steps=2, batch_size=4, seed=100)
        big = asyncio.create_task(engine.generate(big_job, request_id="big"))
        big.add_done_callback(lambda _: order.append("big"))
        await asyncio.get_running_loop().run_in_executor(None, engine.paused.wait, 60)  # image 1 of 4 runs
        small = asyncio.create_task(engine.generate(dataclasses.replace(JOB, steps=2), request_id="small"))
        small.add_done_callback(lambda _: order.append("small"))
        engine.pause_at_step = None
        engine.gate.set()
        images = (await big).images
        await small
        assert order == ["small", "big"]
        assert engine.stats().batches == 5  # 4 one-image batches for the large request, 1 for the small one
        alone = SD3Pipeline(tiny_model)(big_job).images
        assert len(images) == 4
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, alone, strict=True))