"""The job's seed rule: image i of a request uses seed + i (contract: batch_size)."""

from __future__ import annotations

from helpers.jobs import make_job
from sd3serve.engine.job import GenerationJob


def job(seed: int, batch_size: int) -> GenerationJob:
    return make_job(prompt="x", steps=4, seed=seed, batch_size=batch_size)  # fmt: skip


def test_image_i_uses_seed_plus_i() -> None:
    assert job(98552302, 1).seeds == [98552302]
    assert job(98552302, 3).seeds == [98552302, 98552303, 98552304]
    assert job(0, 10).seeds == list(range(10))


def test_the_highest_seed_is_not_wrapped() -> None:
    assert job(2**32 - 1, 2).seeds == [2**32 - 1, 2**32]
