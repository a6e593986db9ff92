"""The generation pipeline on the tiny model: reproducible, batch-invariant, every size."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from helpers.jobs import make_job
from sd3demo.tiny import TinySD3Config, build_tiny_sd3
from sd3serve.catalogue import SAMPLER_NAMES, SCHEDULER_NAMES
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings

JOB = make_job(negative_prompt="blurry", steps=2, seed=11, height=96)


def pixels(pipe: SD3Pipeline, job: GenerationJob) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe(job).images]


def test_same_seed_same_pixels(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    a, b = pixels(pipe, JOB), pixels(pipe, JOB)
    assert np.array_equal(a[0], b[0])
    assert a[0].shape == (96, 64, 3)
    assert not np.array_equal(a[0], pixels(pipe, dataclasses.replace(JOB, seed=12))[0])


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_batch_image_i_equals_single_seed_plus_i(tiny_model: LoadedModel, guidance: float) -> None:
    pipe = SD3Pipeline(tiny_model, exact_batches=True)
    job = dataclasses.replace(JOB, batch_size=3, guidance_scale=guidance)
    batch = pixels(pipe, job)
    for i in range(3):
        single = pixels(pipe, dataclasses.replace(job, seed=job.seed + i, batch_size=1))[0]
        assert np.array_equal(batch[i], single), f"image {i}"


def test_fast_batches_are_close_to_single(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model, exact_batches=False)
    job = dataclasses.replace(JOB, batch_size=2, guidance_scale=2.0)
    batch = pixels(pipe, job)
    single = pixels(pipe, dataclasses.replace(job, seed=job.seed + 1, batch_size=1))[0]
    assert np.abs(batch[1].astype(int) - single.astype(int)).max() <= 2


def test_guidance_and_negative_prompt_change_the_image(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    plain = pixels(pipe, JOB)[0]
    guided = pixels(pipe, dataclasses.replace(JOB, guidance_scale=4.0))[0]
    other_negative = pixels(pipe, dataclasses.replace(JOB, guidance_scale=4.0, negative_prompt="green"))[0]
    assert not np.array_equal(plain, guided)
    assert not np.array_equal(guided, other_negative)
    # With guidance 1 the negative prompt is not used at all.
    assert np.array_equal(plain, pixels(pipe, dataclasses.replace(JOB, negative_prompt="green"))[0])


def test_progress_reports_every_step(tiny_model: LoadedModel) -> None:
    seen: list[tuple[int, int]] = []
    SD3Pipeline(tiny_model)(dataclasses.replace(JOB, steps=3), progress=lambda i, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_sizes_the_model_cannot_take_are_generated_larger_and_cropped(tmp_path: Path) -> None:
    # patch 4 with 8x VAE: the model takes multiples of 32; the contract promises multiples of 16.
    path = build_tiny_sd3(tmp_path / "p4", TinySD3Config(patch=4, hidden=256, heads=2, layers=1, with_t5=False))
    model = load_model(Settings(model=path, device="cpu"))
    assert model.size_multiple == 32
    images = SD3Pipeline(model)(dataclasses.replace(JOB, width=80, height=48)).images
    assert images[0].size == (80, 48)


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [(s, "sgm_uniform") for s in SAMPLER_NAMES] + [("dpmpp_2m", s) for s in SCHEDULER_NAMES if s != "sgm_uniform"],
)
def test_every_sampler_and_scheduler_through_the_pipeline(
    tiny_model: LoadedModel, sampler: str, scheduler: str
) -> None:
    job = dataclasses.replace(JOB, sampler=sampler, scheduler=scheduler, steps=3, guidance_scale=2.0, batch_size=2)
    images = pixels(SD3Pipeline(tiny_model), job)
    assert len(images) == 2 and images[0].shape == (96, 64, 3)
    assert not np.array_equal(images[0], images[1])


def test_t5_window_is_diffusers_default_or_the_tokenizers_shorter_limit(tiny_model: LoadedModel) -> None:
    from sd3serve.engine.pipeline import t5_length

    pipe = tiny_model.pipe
    assert pipe.tokenizer_3.model_max_length > 256 and t5_length(pipe) == 256  # SD3.5's tokenizer says 512
    embeds, _ = SD3Pipeline(tiny_model).encode_text("a red circle")
    assert embeds.shape[1] == pipe.tokenizer_max_length + 256
    pipe.tokenizer_3.model_max_length = 16  # the demo model's
    try:
        assert t5_length(pipe) == 16
        assert SD3Pipeline(tiny_model).encode_text("a red circle")[0].shape[1] == pipe.tokenizer_max_length + 16
    finally:
        pipe.tokenizer_3.model_max_length = 512


def test_demo_prompts_are_read_in_lower_case_without_punctuation() -> None:
    """The demo's tokenizers know its lower-case words only: capitals and punctuation draw the same picture."""
    from sd3serve.engine.pipeline import normalise_demo_prompt

    assert normalise_demo_prompt("A Red Circle On A Blue Background.") == "a red circle on a blue background"
    assert normalise_demo_prompt("a  LARGE green cross, at the top-left!") == "a large green cross at the top left"
    demo = load_model(Settings(device="cpu"))  # the embedded demo model
    assert demo.normalise_prompts
    pipe = SD3Pipeline(demo)
    job = make_job(prompt="a red circle on a blue background", steps=2, seed=3, width=128, height=128)  # fmt: skip
    shouted = dataclasses.replace(job, prompt="A Red Circle On A Blue Background.")
    assert np.array_equal(pixels(pipe, job)[0], pixels(SD3Pipeline(demo), shouted)[0])  # no shared cache entry
    assert not pipe.is_truncated("A Red Circle On A Blue Background.")
    as_typed = SD3Pipeline(dataclasses.replace(demo, normalise_prompts=False))  # what the demo drew before
    assert not np.array_equal(pixels(pipe, job)[0], pixels(as_typed, shouted)[0])
