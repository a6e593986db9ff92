"""Each speed option keeps the image within a stated tolerance of the plain path (on the CPU, where it exists).

Tolerances, in 8-bit pixel values of a 2-step 256² image from the tiny random-weight model (which amplifies
float noise far more than a trained one): fused QKV, channels-last and compile change only the order of float
sums: mean difference ≤ 1 and 99.9% of values within 8. VAE tiling (768², 512-pixel tiles) blends overlapping
tiles that see less context at their borders: mean difference ≤ 6.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from helpers.jobs import make_job
from sd3serve.engine.acceleration import apply_acceleration
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings

JOB = make_job(
    negative_prompt="blurry", steps=2, guidance_scale=2.0, seed=4, sampler="dpmpp_2m", scheduler="sgm_uniform",
    width=256, height=256,
)  # fmt: skip


def image(model_dir: Path, job: GenerationJob = JOB, **options: object) -> np.ndarray:
    settings = Settings(model=model_dir, device="cpu", **options)
    model = load_model(settings)
    apply_acceleration(model, settings)
    pipe = SD3Pipeline(model, vae_tiling=settings.vae_tiling)
    return np.asarray(pipe(job).images[0]).astype(int)


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> np.ndarray:
    return image(tiny_model_dir, channels_last_vae="off", vae_subpixel="off")


@pytest.mark.parametrize(
    "options",
    [{"fuse_qkv": "on"}, {"channels_last_vae": "on"}, {"compile": "regional"}],
    ids=["fused-qkv", "channels-last", "compile-regional"],
)
def test_option_stays_close(tiny_model_dir: Path, plain: np.ndarray, options: dict) -> None:
    diff = np.abs(image(tiny_model_dir, **options) - plain)
    assert diff.mean() <= 1 and np.percentile(diff, 99.9) <= 8, (diff.mean(), np.percentile(diff, 99.9))


def test_vae_tiling_stays_close(tiny_model_dir: Path) -> None:
    big = dataclasses.replace(JOB, width=768, height=768)
    plain, tiled = image(tiny_model_dir, job=big, vae_tiling="off"), image(tiny_model_dir, job=big, vae_tiling="on")
    assert np.abs(tiled - plain).mean() <= 6, np.abs(tiled - plain).mean()


def test_auto_tiles_only_large_images(tiny_model: object) -> None:
    pipe = SD3Pipeline(tiny_model, vae_tiling="auto")  # type: ignore[arg-type]
    pipe(dataclasses.replace(JOB, width=64, height=64, steps=1))
    assert not pipe.model.pipe.vae.use_tiling


def test_offload_needs_cuda(tiny_model_dir: Path) -> None:
    settings = Settings(model=tiny_model_dir, device="cpu", offload="model")
    with pytest.raises(ValueError, match="CUDA"):
        apply_acceleration(load_model(settings), settings)


def test_fusing_qkv_costs_no_memory(tiny_model_dir: Path) -> None:
    """diffusers keeps the separate Q, K, V layers beside the fused one; we drop them (2.5 GiB on SD3.5 Large)."""
    from sd3serve.engine.acceleration import fuse_qkv, is_fused

    transformer = load_model(Settings(model=tiny_model_dir, device="cpu", fuse_qkv="off")).pipe.transformer
    nbytes = lambda: sum(p.numel() * p.element_size() for p in transformer.parameters())  # noqa: E731
    before = nbytes()
    fuse_qkv(transformer)
    assert is_fused(transformer) and nbytes() == before
    fused = [m for m in transformer.modules() if hasattr(m, "to_qkv")]
    assert fused and not any(hasattr(m, "to_q") or hasattr(m, "add_q_proj") for m in fused)


@pytest.mark.parametrize(
    ("mode", "side", "tiled"),
    [("auto", 1536, False), ("auto", 1552, True), ("auto", 2048, True), ("off", 2048, False), ("on", 64, True)],
)
def test_decode_tiles_by_size(
    tiny_model: object, monkeypatch: pytest.MonkeyPatch, mode: str, side: int, tiled: bool
) -> None:
    """In "auto" mode, tile a decode whose longer side is above 1536 pixels (the decision only: the VAE is stubbed)."""
    import torch

    pipe = SD3Pipeline(tiny_model, vae_tiling=mode)  # type: ignore[arg-type]
    vae, f = pipe.vae, pipe.model.vae_scale_factor
    seen: list[bool] = []

    def fake_decode(z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        seen.append(vae.use_tiling)
        return (torch.zeros(z.shape[0], 3, 8, 8),)

    monkeypatch.setattr(vae, "decode", fake_decode)
    latents = torch.zeros(1, vae.config.latent_channels, 64 // f, side // f)  # (B, C, h, w): 64 × side pixels
    assert len(pipe.decode(latents)) == 1
    assert seen == [tiled]
