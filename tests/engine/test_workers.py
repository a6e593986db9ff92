"""Several model workers in one process: each request's bytes are what one worker makes, whichever worker ran it
and however many ran at once; torch's thread settings per phase are restored after each request."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch

from helpers.jobs import make_job
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationResult
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import SD3Pipeline, build_pipeline
from sd3serve.imaging import ImageFormat, encode_image
from sd3serve.settings import Settings
from sd3serve.threads import PhaseThreads

JOB = make_job(steps=2, sampler="dpmpp_2m", scheduler="sgm_uniform")  # fmt: skip
JOBS = [dataclasses.replace(JOB, prompt=p, seed=s) for p, s in
        [("a red circle", 1), ("a blue square", 2), ("a green star", 3), ("a red circle", 4), ("a cat", 5),
         ("a blue square", 6)]]  # fmt: skip


def png(result: GenerationResult) -> list[bytes]:
    return [encode_image(im, ImageFormat.png, 90) for im in result.images]


async def _served(model: LoadedModel, workers: int, threads_seen: set[str]) -> list[list[bytes]]:
    engine = BatchingEngine(Settings(device="cpu", model_workers=workers, malloc_tuning="off"), model)
    await engine.start()
    original = engine.pipeline.generate_many.__func__  # type: ignore[attr-defined]
    try:
        assert engine.workers == workers
        # record which thread ran each batch
        def spy(self: SD3Pipeline, *args: object, **kwargs: object) -> list[GenerationResult]:
            threads_seen.add(threading.current_thread().name)
            return original(self, *args, **kwargs)  # type: ignore[no-any-return]

        SD3Pipeline.generate_many = spy  # type: ignore[assignment,method-assign]
        results = await asyncio.gather(*(engine.generate(j, request_id=f"r{i}") for i, j in enumerate(JOBS)))
    finally:
        SD3Pipeline.generate_many = original  # type: ignore[method-assign]
        await engine.close()
    return [png(r) for r in results]


def test_two_workers_give_the_bytes_of_one(tiny_model: LoadedModel) -> None:
    one_threads: set[str] = set()
    two_threads: set[str] = set()
    one = asyncio.run(_served(tiny_model, 1, one_threads))
    two = asyncio.run(_served(tiny_model, 2, two_threads))
    assert len(one_threads) == 1 and len(two_threads) == 2  # the second worker did run requests
    assert one == two
    alone = build_pipeline(Settings(device="cpu", malloc_tuning="off"), tiny_model)
    assert [png(alone(j)) for j in JOBS] == one


def test_worker_pipelines_share_weights_and_cache_but_not_the_tiling_switch(tiny_model: LoadedModel) -> None:
    first = build_pipeline(Settings(device="cpu", malloc_tuning="off"), tiny_model)
    second = first.worker()
    assert second.model is first.model and second.prompt_cache is first.prompt_cache
    assert second.decode_slots is first.decode_slots
    assert second.vae.decoder is first.vae.decoder
    second.vae.use_tiling = not first.vae.use_tiling
    assert second.vae.use_tiling != first.vae.use_tiling


def test_phase_threads_apply_per_phase_and_are_restored(tiny_model: LoadedModel) -> None:
    plan = PhaseThreads(denoise=1, decode=2, workers=1, cores=2)
    pipe = SD3Pipeline(tiny_model, threads=plan)
    seen: dict[str, int] = {}
    hook = pipe.model.pipe.transformer.register_forward_pre_hook(
        lambda *_: seen.__setitem__("denoise", torch.get_num_threads())
    )
    decode = pipe.decode

    def spy_decode(latents: torch.Tensor) -> list:
        seen["decode"] = torch.get_num_threads()
        return decode(latents)

    pipe.decode = spy_decode  # type: ignore[method-assign]
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        pipe(JOB)
        assert seen == {"denoise": 1, "decode": 2}
        assert torch.get_num_threads() == 3  # restored
        pipe.decode = lambda latents: (_ for _ in ()).throw(RuntimeError("decode failed"))  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="decode failed"):
            pipe(JOB)
        assert torch.get_num_threads() == 3  # restored after a failure too
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_workers_take_turns_to_decode_on_every_core(tiny_model: LoadedModel) -> None:
    """The decode's thread count never depends on the load (channels-last sums depend on it): a fixed count, and
    as many decodes at once as the cores hold."""
    first = build_pipeline(Settings(device="cpu", threads=2, model_workers=2, malloc_tuning="off"), tiny_model)
    second = first.worker()
    assert first.decode_threads() == second.decode_threads() == 2
    assert first.decode_slots is second.decode_slots and first.decode_slots is not None
    assert first.decode_slots.acquire(blocking=False)
    try:
        assert not second.decode_slots.acquire(blocking=False)  # one decode at a time on 2 cores
    finally:
        first.decode_slots.release()
    assert PhaseThreads(denoise=1, decode=2, workers=4, cores=8).decode_slots == 4
    assert SD3Pipeline(tiny_model).decode_threads() is None  # no plan: torch's setting as it is
