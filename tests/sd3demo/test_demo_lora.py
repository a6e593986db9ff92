"""The shipped demo adapter (striped backgrounds) through the engine as the server builds it, and the judge."""

from __future__ import annotations

import dataclasses

from helpers.jobs import make_job
from sd3demo.judge import striped
from sd3demo.world import held_out_scenes, render, render_striped
from sd3serve.engine.lora_names import DEMO_LORA_DIR, adapter_files
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.settings import Settings


def test_the_judge_sees_stripes_only_where_they_are() -> None:
    scenes = held_out_scenes(40, seed=3)
    assert all(striped(render_striped(s, 256)) for s in scenes)
    assert not any(striped(render(s, 256)) for s in scenes)


def test_the_demo_adapter_draws_stripes_the_base_model_never_draws() -> None:
    assert list(adapter_files(DEMO_LORA_DIR)) == ["striped"]
    pipe = build_pipeline(Settings(device="cpu"))  # the demo model: its adapters without --lora-dir
    with_hits = without_hits = 0
    scenes = held_out_scenes(6, seed=2026)
    for i, scene in enumerate(scenes):
        job = make_job(
            prompt=scene.caption(), steps=4, seed=i, sampler="dpmpp_2m", scheduler="sgm_uniform", width=256,
            height=256,
        )
        without_hits += striped(pipe(job).images[0])
        with_hits += striped(pipe(dataclasses.replace(job, loras=(("striped", 1.0),))).images[0])
    assert with_hits >= 5 and without_hits == 0, (with_hits, without_hits)
