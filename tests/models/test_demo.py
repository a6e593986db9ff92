"""The demo model shipped in the package (``src/sd3serve/models/demo``), as the server loads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.jobs import make_job
from sd3demo.judge import judge
from sd3serve.engine.loading import load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings

DEMO = Path(__file__).resolve().parents[2] / "src" / "sd3serve" / "models" / "demo"


def test_shipped_demo_model_draws_the_seed_request() -> None:
    if not (DEMO / "model_index.json").exists():
        pytest.skip("no trained demo model in the package")
    size = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert size <= 30 * 2**20
    assert not list(DEMO.rglob("*.bin")) and len(list(DEMO.rglob("*.safetensors"))) == 5
    model = load_model(Settings(model=DEMO, device="cpu"))
    job = make_job(
        prompt="a red circle on a blue background", steps=4, seed=0, sampler="dpmpp_2m", scheduler="sgm_uniform",
        width=512, height=512,
    )
    verdict = judge(SD3Pipeline(model)(job).images[0])
    assert (verdict.background, verdict.colour, verdict.shape, verdict.position, verdict.size) == (
        "blue",
        "red",
        "circle",
        "center",
        "medium",
    )
