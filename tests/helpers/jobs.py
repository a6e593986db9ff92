"""Generation jobs for tests: ``make_job(steps=4, width=128)`` is the default small job with those fields changed."""

from __future__ import annotations

from typing import Any

from sd3serve.engine.job import GenerationJob

DEFAULTS: dict[str, Any] = {
    "prompt": "a red circle",
    "negative_prompt": "",
    "steps": 1,
    "guidance_scale": 1.0,
    "seed": 5,
    "sampler": "euler",
    "scheduler": "simple",
    "width": 64,
    "height": 64,
    "batch_size": 1,
}


def make_job(**fields: Any) -> GenerationJob:
    """A 64x64, one-step, one-image Euler job of "a red circle", with ``fields`` changed."""
    return GenerationJob(**(DEFAULTS | fields))
