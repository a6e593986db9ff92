"""Engine contracts that bench/mutate.py showed untested: a request that expires in the queue leaves it (it is
never run), and the rows of an aborted job stop going through the model while its batch mates go on."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch

from gated import GatedEngine
from helpers.engines import held, started
from helpers.jobs import make_job
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import FlowDenoiser, SD3Pipeline
from sd3serve.errors import QueueTimeout
from sd3serve.settings import Settings

JOB = make_job(steps=3)  # fmt: skip


@pytest.mark.anyio
async def test_a_request_that_expires_in_the_queue_leaves_it_and_never_runs(tiny_model: LoadedModel) -> None:
    async with started(GatedEngine(Settings(device="cpu", batch_wait_ms=0, queue_timeout_s=0.3), tiny_model)) as engine:
        running = await held(engine, JOB)
        queued = asyncio.create_task(engine.generate(dataclasses.replace(JOB, steps=2), request_id="late"))
        with pytest.raises(QueueTimeout):
            await asyncio.wait_for(queued, timeout=30)
        # Out of the queue at its deadline, while the batch is still held: nothing left to run for it.
        assert (engine.queue_depth, engine.position("late")) == (0, None)
        engine.gate.set()
        await running
        for _ in range(20):  # give the worker the chance to (wrongly) run it
            await asyncio.sleep(0.01)
        assert engine.stats().batches == 1  # "running" only (the warm-up is not a batch)


def test_an_aborted_jobs_rows_leave_the_model_and_its_batch_mate_is_exact(
    tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows_seen: list[int] = []
    forward = FlowDenoiser._forward

    def counting(self: FlowDenoiser, x: torch.Tensor, *args: object) -> torch.Tensor:
        rows_seen.append(x.shape[0])
        return forward(self, x, *args)  # type: ignore[arg-type]

    pipe = SD3Pipeline(tiny_model)
    stays, leaves = JOB, dataclasses.replace(JOB, prompt="a blue square", seed=11)
    expected = np.asarray(pipe(stays).images[0])
    monkeypatch.setattr(FlowDenoiser, "_forward", counting)
    calls = [0]

    def live() -> list[bool]:  # asked before every model call: "leaves" goes away after the first one
        calls[0] += 1
        return [True, calls[0] <= 1]

    results = pipe.generate_many([stays, leaves], live=live)
    # step 1: both rows (one forward each, exact batches); steps 2 and 3: the live row only
    assert sum(rows_seen) == 2 + 1 + 1, rows_seen
    assert len(results[1].images) == 0 and len(results[0].images) == 1
    assert np.array_equal(np.asarray(results[0].images[0]), expected)
