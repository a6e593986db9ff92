"""A request larger than one batch runs in chunks: its progress counts over the whole request, and its queue
deadline is for waiting to start (a started request that waits again between its chunks is not failed)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from gated import CountingGate
from helpers.engines import started
from helpers.jobs import make_job
from sd3serve.engine.loading import LoadedModel
from sd3serve.errors import QueueTimeout
from sd3serve.settings import Settings

JOB = make_job(negative_prompt="blurry", steps=4, batch_size=2)  # fmt: skip


@pytest.mark.anyio
async def test_progress_counts_over_the_whole_split_request(tiny_model: LoadedModel) -> None:
    async with started(CountingGate(Settings(device="cpu", batch_wait_ms=0, max_batch_images=1), tiny_model)) as engine:
        seen: list[tuple[int, int]] = []
        result = await engine.generate(JOB, request_id="big", progress=lambda s, t: seen.append((s, t)))
    assert len(result.images) == 2 and engine.stats().batches == 2
    # Two images of 4 steps, one per batch, each reporting steps 0 (start) to 4: after step k of image i
    # (0-based) the request is (4i + k) / 8 done, i.e. step (4i + k) // 2 of 4. Never backwards, 4 only at the end.
    first = [(k // 2, 4) for k in range(5)]
    second = [((4 + k) // 2, 4) for k in range(5)]
    assert seen == first + second
    assert seen == [(0, 4), (0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (2, 4), (3, 4), (3, 4), (4, 4)]


@pytest.mark.anyio
async def test_a_started_request_waiting_between_chunks_is_not_failed_by_its_deadline(tiny_model: LoadedModel) -> None:
    loop = asyncio.get_running_loop()
    settings = Settings(device="cpu", batch_wait_ms=0, max_batch_images=1, queue_timeout_s=0.5)
    engine = CountingGate(settings, tiny_model)
    await engine.start()
    first_gate, second_gate = threading.Event(), threading.Event()
    engine.pause_at_step, engine.gate = 1, first_gate
    try:
        big = asyncio.create_task(engine.generate(dataclasses.replace(JOB, steps=2), request_id="big"))
        await loop.run_in_executor(None, engine.paused.wait, 60)  # the big request's first image runs
        small_job = dataclasses.replace(JOB, steps=2, batch_size=1, seed=9)
        small = asyncio.create_task(engine.generate(small_job, request_id="small"))
        while engine.queue_depth != 1:
            await asyncio.sleep(0.01)
        engine.paused.clear()
        engine.gate = second_gate
        first_gate.set()  # the first image ends; the big request waits again, behind the small one
        await loop.run_in_executor(None, engine.paused.wait, 60)  # the small request runs, held
        assert engine.queue_depth == 1  # the big request, between its images
        late = asyncio.create_task(engine.generate(small_job, request_id="late"))
        with pytest.raises(QueueTimeout):  # late waited its 0.5 s behind the big request...
            await asyncio.wait_for(late, timeout=60)
        assert not big.done()  # ... which has waited longer, and was not failed: it had started
        second_gate.set()
        assert len((await small).images) == 1
        assert len((await asyncio.wait_for(big, timeout=120)).images) == 2
    finally:
        first_gate.set()
        second_gate.set()
        await engine.close()
