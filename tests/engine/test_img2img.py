"""Image-to-image in the engine: ComfyUI's denoise schedule, the start latent, batches and the batching key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from sd3demo.tiny import TinySD3Config, build_tiny_sd3
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.img2img import MAX_SCHEDULE, img2img_sigmas
from sd3serve.engine.init_image import InitImage
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.engine.pipeline import SD3Pipeline, batch_key
from sd3serve.engine.schedules import sampler_sigmas
from sd3serve.settings import Settings

FLOW = FlowSampling(shift=3.0)


def job(**kw: object) -> GenerationJob:
    base = dict(prompt="a red circle", negative_prompt="", steps=3, guidance_scale=1.0, seed=5, sampler="euler",
                scheduler="simple", width=64, height=64, batch_size=1)  # fmt: skip
    return GenerationJob(**{**base, **kw})  # type: ignore[arg-type]


def gradient(width: int = 64, height: int = 64) -> InitImage:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1)
    return InitImage.from_array(rgb.astype(np.uint8))


def pixels(pipe: SD3Pipeline, j: GenerationJob) -> list[np.ndarray]:
    return [np.asarray(im) for im in pipe(j).images]


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "uni_pc", "dpm_2"])
@pytest.mark.parametrize(("steps", "strength"), [(4, 0.5), (4, 0.7), (10, 0.33), (1, 0.9)])
def test_sigmas_are_the_last_steps_of_a_longer_schedule(sampler: str, steps: int, strength: float) -> None:
    sigmas = img2img_sigmas(sampler, "sgm_uniform", FLOW, steps, strength)
    longer = sampler_sigmas(sampler, "sgm_uniform", FLOW, int(steps / strength))
    assert len(sigmas) == steps + 1
    assert torch.equal(sigmas, longer[-(steps + 1) :])
    assert float(sigmas[-1]) == 0.0
    assert (float(sigmas[0]) < 1.0) == (int(steps / strength) > steps)  # 1 step at 0.9: int(1.1) = 1, the plain one


def test_full_strength_is_the_plain_schedule_and_zero_is_none() -> None:
    plain = sampler_sigmas("euler", "simple", FLOW, 4)
    assert torch.equal(img2img_sigmas("euler", "simple", FLOW, 4, 1.0), plain)
    assert torch.equal(img2img_sigmas("euler", "simple", FLOW, 4, 0.99995), plain)
    assert len(img2img_sigmas("euler", "simple", FLOW, 4, 0.0)) == 0


def test_a_tiny_strength_is_capped() -> None:
    sigmas = img2img_sigmas("euler", "simple", FLOW, 70, 1e-9)
    assert len(sigmas) == 71
    assert torch.equal(sigmas, sampler_sigmas("euler", "simple", FLOW, MAX_SCHEDULE)[-71:])


def test_steps_run_work_and_price_basis() -> None:
    init = gradient()
    assert job(init=init, strength=0.0).steps_run == 0 and job(init=init, strength=0.0).model_calls == 0
    assert job(init=init, strength=0.4).steps_run == 3
    assert job(strength=0.0).steps_run == 3  # without an image strength means nothing


def test_full_strength_img2img_is_the_txt2img_picture(tiny_model: LoadedModel) -> None:
    """σ0 = 1: x = ε, the seed's txt2img start noise, whatever the image."""
    pipe = SD3Pipeline(tiny_model)
    txt = pixels(pipe, job())
    img = pixels(pipe, job(init=gradient(), strength=1.0))
    assert np.array_equal(txt[0], img[0])


def test_strength_zero_is_the_vae_round_trip_and_lower_strength_stays_closer(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    init = gradient()
    zero = pixels(pipe, job(init=init, strength=0.0))[0]
    again = pixels(pipe, job(init=init, strength=0.0, seed=99))[0]
    assert np.array_equal(zero, again)  # no noise at all: the seed does not matter
    latent_only = pixels(pipe, job(init=init, strength=0.3))[0]
    full = pixels(pipe, job(init=init, strength=1.0))[0]
    d = lambda a, b: float(np.abs(a.astype(float) - b.astype(float)).mean())  # noqa: E731
    assert d(latent_only, zero) < d(full, zero)


def test_batch_image_i_equals_single_seed_plus_i(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    init = gradient()
    batch = pixels(pipe, job(init=init, strength=0.6, batch_size=3, sampler="euler_ancestral"))
    for i in range(3):
        alone = pixels(pipe, job(init=init, strength=0.6, seed=5 + i, sampler="euler_ancestral"))[0]
        assert np.array_equal(batch[i], alone)


def test_two_requests_with_the_same_image_share_a_batch_and_get_their_own_pictures(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    init = gradient()
    a, b = job(init=init, strength=0.6, prompt="a red circle"), job(init=init, strength=0.6, prompt="a blue square")
    together = pipe.generate_many([a, b])
    assert np.array_equal(np.asarray(together[0].images[0]), pixels(pipe, a)[0])
    assert np.array_equal(np.asarray(together[1].images[0]), pixels(pipe, b)[0])


def test_sizes_the_model_cannot_take_are_padded_and_cropped(tmp_path: Path) -> None:
    # patch 4 with 8x VAE: the model takes multiples of 32; the image is padded (edges replicated), then cropped
    path = build_tiny_sd3(tmp_path / "p4", TinySD3Config(patch=4, hidden=256, heads=2, layers=1, with_t5=False))
    pipe = SD3Pipeline(load_model(Settings(model=path, device="cpu")))
    assert pipe.model.size_multiple == 32
    out = pipe(job(init=gradient(80, 48), strength=0.0, width=80, height=48)).images[0]
    assert out.size == (80, 48)


def test_the_batching_key_holds_everything_that_changes_the_computation() -> None:
    init, other = gradient(), gradient(64, 64)
    other = InitImage.from_array(np.zeros((64, 64, 3), np.uint8))
    base = job(init=init, strength=0.5)
    assert batch_key(base) == batch_key(dataclasses.replace(base, prompt="x", seed=9, batch_size=2))
    for changed in (
        dataclasses.replace(base, init=other),
        dataclasses.replace(base, strength=0.6),
        dataclasses.replace(base, init=None),
        dataclasses.replace(base, loras=(("a", 1.0),)),
        dataclasses.replace(base, loras=(("a", 0.5),)),
    ):
        assert batch_key(changed) != batch_key(base)
    assert batch_key(job(loras=(("a", 1.0), ("b", 1.0)))) != batch_key(job(loras=(("b", 1.0), ("a", 1.0))))


def test_jobs_of_different_images_are_refused_in_one_batch(tiny_model: LoadedModel) -> None:
    pipe = SD3Pipeline(tiny_model)
    other = InitImage.from_array(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="image, adapters"):
        pipe.generate_many([job(init=gradient(), strength=0.5), job(init=other, strength=0.5)])


def test_init_image_checks_its_size() -> None:
    with pytest.raises(ValueError):
        InitImage(pixels=b"\0" * 10, width=2, height=2)
    assert gradient().digest != InitImage.from_array(np.zeros((64, 64, 3), np.uint8)).digest
