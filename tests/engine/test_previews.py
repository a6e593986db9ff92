"""Live previews in the engine: the latent→RGB maps, one picture per step of the rows that ask, nothing computed
for the rows that do not, and the pictures unchanged by watching."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sd3demo.world import Scene, render
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel, load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.engine.previews import SD3, LatentRGB, PreviewHook, decoded_at_latent_grid, fit, latent_rgb_for
from sd3serve.settings import Settings

DEMO_JOB = GenerationJob(
    prompt="a yellow square at the top right on a blue background", negative_prompt="", steps=4, guidance_scale=1.0,
    seed=3, sampler="dpmpp_2m", scheduler="sgm_uniform", width=256, height=256, batch_size=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def demo() -> LoadedModel:
    return load_model(Settings(device="cpu"))


class Recorder:
    """A preview hook that records what it gets; ``want`` says which rows ask."""

    def __init__(self, want: list[int]) -> None:
        self.want = want
        self.asked = 0
        self.got: list[tuple[int, int, int, np.ndarray]] = []
        self.hook = PreviewHook(rows=self._rows, put=lambda *a: self.got.append(a))

    def _rows(self) -> list[int]:
        self.asked += 1
        return self.want


def scene_latents(model: LoadedModel, scenes: list[Scene]) -> torch.Tensor:
    """Rendered demo scenes encoded by the demo VAE, in the model's latent space."""
    vae = model.pipe.vae
    rgb = np.stack([np.array(render(s, 256)) for s in scenes])  # (N, H, W, 3)
    pixels = torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(pixels).latent_dist.mode()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def test_the_demo_map_is_fitted_from_its_vae_and_beats_the_zero_map(demo: LoadedModel) -> None:
    held_out = [Scene("green", "triangle", "purple", position="bottom left"), Scene("white", "cross", "black"),
                Scene("orange", "diamond", "white", position="top", size="large")]  # fmt: skip
    latents = scene_latents(demo, held_out)
    target = decoded_at_latent_grid(demo, latents)  # what the VAE draws, one pixel per latent cell, [-1, 1]
    demo_map = latent_rgb_for(demo)
    assert demo_map != SD3 and demo_map.channels == 16
    err = float(((demo_map.linear(latents).clamp(-1, 1) - target) ** 2).mean())
    zero = float((target**2).mean())
    sd3 = float(((SD3.linear(latents).clamp(-1, 1) - target) ** 2).mean())
    assert err < 0.05 * zero and err < 0.05 * sd3, (err, zero, sd3)


def test_fit_recovers_a_linear_map_and_round_trips_through_json() -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g)
    latents = torch.randn(4, 5, 6, 6, generator=g)
    rgb = torch.einsum("bchw,cr->brhw", latents, weight) + torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)
    m = fit(latents, rgb)
    assert np.allclose(m.weight, weight.numpy(), atol=1e-4) and np.allclose(m.bias, [0.1, -0.2, 0.3], atol=1e-4)
    assert LatentRGB.from_json(m.to_json()) == m


def test_sd3_models_get_the_published_map(tiny_model: LoadedModel) -> None:
    assert latent_rgb_for(tiny_model) == SD3  # 16 channels, not the demo
    assert SD3.channels == 16 and len(SD3.bias) == 3


def test_one_preview_per_step_for_the_rows_that_ask_and_the_pictures_unchanged(demo: LoadedModel) -> None:
    pipe = SD3Pipeline(demo)
    plain = [np.asarray(im) for im in pipe(DEMO_JOB).images]
    watched = Recorder(want=[1])
    images = [np.asarray(im) for im in pipe(DEMO_JOB, previews=watched.hook).images]
    assert all(np.array_equal(a, b) for a, b in zip(plain, images, strict=True))  # watching changes nothing
    assert [(row, step, steps) for row, step, steps, _ in watched.got] == [(1, k, 4) for k in (1, 2, 3, 4)]
    last = watched.got[-1][3]
    assert last.shape == (16, 16, 3) and last.dtype == np.uint8
    # The last preview resembles the final picture of that row, downsized to the latent grid.
    final = np.asarray(Image.fromarray(images[1]).resize((16, 16), Image.Resampling.BOX)).astype(float)
    assert np.abs(last.astype(float).mean((0, 1)) - final.mean((0, 1))).max() < 12
    corr = np.corrcoef(last.astype(float).ravel(), final.ravel())[0, 1]
    assert corr > 0.95, corr
    # The first preview is already the scene's layout: closer to the final picture than to mid-grey.
    first = watched.got[0][3].astype(float)
    assert np.abs(first - final).mean() < np.abs(127.5 - final).mean()

    nobody = Recorder(want=[])
    pipe(DEMO_JOB, previews=nobody.hook)
    assert nobody.got == [] and nobody.asked > 0  # asked at every model call, nothing computed


def test_previews_of_a_per_row_sampler(demo: LoadedModel) -> None:
    """dpm_adaptive integrates each image through its own row view: the previews still name the batch row."""
    job = dataclasses.replace(DEMO_JOB, sampler="dpm_adaptive", steps=3, width=64, height=64)
    watched = Recorder(want=[1])
    SD3Pipeline(demo)(job, previews=watched.hook)
    assert watched.got and {row for row, *_ in watched.got} == {1}


@torch.no_grad()
def test_another_latent_layout_gets_a_map_fitted_from_its_vae() -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=1)  # fmt: skip
    model = SimpleNamespace(
        pipe=SimpleNamespace(vae=vae, transformer=SimpleNamespace(config=SimpleNamespace(in_channels=4))),
        normalise_prompts=False, device=torch.device("cpu"), dtype=torch.float32, vae_scale_factor=2,
    )  # fmt: skip
    fitted = latent_rgb_for(model)  # type: ignore[arg-type]
    assert fitted.channels == 4
    held_out = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    target = decoded_at_latent_grid(model, held_out)  # type: ignore[arg-type]
    err = float(((fitted.linear(held_out).clamp(-1, 1) - target) ** 2).mean())
    assert err < float((target**2).mean())  # better than the zero map
