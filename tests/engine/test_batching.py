"""The batching engine: compatible requests share a forward pass and get exactly what they get alone."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest

from gated import GatedEngine
from helpers.engines import held, started
from helpers.jobs import make_job
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.errors import Overloaded, QueueTimeout
from sd3serve.settings import Settings

JOB = make_job(negative_prompt="blurry", steps=2)  # fmt: skip


def arrays(result: object) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]  # type: ignore[attr-defined]


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _batched(model: LoadedModel, jobs: list[GenerationJob], **settings: object) -> tuple[list, list[int]]:
    sizes: list[int] = []
    async with started(BatchingEngine(
        Settings(device="cpu", batch_wait_ms=300, **settings), model, on_batch=lambda n, s: sizes.append(n)
    )) as engine:
        results = await asyncio.gather(*(engine.generate(j, request_id=f"r{i}") for i, j in enumerate(jobs)))
    return results, sizes


def test_compatible_requests_share_a_batch_and_match_alone(tiny_model: LoadedModel) -> None:
    jobs = [
        JOB,
        dataclasses.replace(JOB, prompt="a blue square", seed=9, batch_size=2),
        dataclasses.replace(JOB, steps=3),  # another step count: its own batch
        dataclasses.replace(JOB, prompt="a green star", seed=1),
    ]
    results, sizes = run(_batched(tiny_model, jobs, max_batch_images=4))  # type: ignore[misc]
    assert sorted(sizes) == [1, 4]
    alone = SD3Pipeline(tiny_model)
    for job, result in zip(jobs, results, strict=True):
        expected = arrays(alone(job))
        got = arrays(result)
        assert len(got) == job.batch_size
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_batches_respect_the_image_limit(tiny_model: LoadedModel) -> None:
    jobs = [dataclasses.replace(JOB, seed=i) for i in range(5)]
    _, sizes = run(_batched(tiny_model, jobs, max_batch_images=2))  # type: ignore[misc]
    assert sorted(sizes) == [1, 2, 2]


def test_prompt_cache_gives_identical_images(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model, prompt_cache_bytes=2**20)
    guided = dataclasses.replace(JOB, guidance_scale=3.0)
    first = arrays(pipe(guided))
    assert (pipe.prompt_cache.hits, pipe.prompt_cache.misses) == (0, 2)  # prompt and negative prompt
    second = arrays(pipe(guided))
    assert pipe.prompt_cache.hits == 2
    uncached = arrays(SD3Pipeline(tiny_model, prompt_cache_bytes=0)(guided))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[0], uncached[0])


@pytest.mark.anyio
async def test_full_queue_is_503_and_deadline_fails_queued(tiny_model: LoadedModel) -> None:
    settings = Settings(device="cpu", max_queue=2, batch_wait_ms=0, queue_timeout_s=0.3)
    async with started(GatedEngine(settings, tiny_model)) as engine:
        running = await held(engine, JOB)
        other = dataclasses.replace(JOB, steps=3)  # not batchable with the running one
        queued = [asyncio.create_task(engine.generate(other, request_id=f"q{i}")) for i in range(2)]
        await asyncio.sleep(0)
        assert engine.queue_depth == 2
        with pytest.raises(Overloaded) as e:
            await engine.generate(other, request_id="rejected")
        assert e.value.retry_after_s >= 1
        await asyncio.sleep(0.4)  # past the deadline
        engine.gate.set()
        await running
        for q in queued:
            with pytest.raises(QueueTimeout):
                await q


@pytest.mark.anyio
async def test_cancelled_queued_request_is_dropped(tiny_model: LoadedModel) -> None:
    async with started(GatedEngine(Settings(device="cpu", batch_wait_ms=0), tiny_model)) as engine:
        running = await held(engine, JOB)
        waiting = asyncio.create_task(engine.generate(dataclasses.replace(JOB, steps=3), request_id="w"))
        await asyncio.sleep(0)
        assert engine.queue_depth == 1
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert engine.queue_depth == 0
        engine.gate.set()
        await running