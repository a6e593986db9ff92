"""The VAE's upsamplers computed on the coarse grid (one transposed convolution) give the pixels of diffusers'
upsample-then-convolve, and the CPU defaults (sub-pixel upsampling, in-place resnet blocks, channels-last VAE) stay
within the ComfyUI-parity tolerance of 2 levels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from helpers.jobs import make_job
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.engine.subpixel import SubpixelUpsample, fusable, fuse_upsamplers
from sd3serve.settings import Settings

PARITY_LEVELS = 2  # tests/engine/test_comfy_parity.py's tolerance, in 8-bit levels

JOB = make_job(
    prompt="a red circle at the top on a blue background", steps=2, seed=3, sampler="dpmpp_2m",
    scheduler="sgm_uniform", width=256, height=256,
)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(8, 8, 5, 7), (32, 16, 1, 1), (3, 5, 16, 9)])
def test_subpixel_upsample_matches_upsample2d(channels_last: bool, cin: int, cout: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    up = Upsample2D(cin, use_conv=True, out_channels=cout)
    assert fusable(up)
    x = torch.randn(2, cin, h, w)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, up = x.contiguous(memory_format=fmt), up.to(memory_format=fmt)
    with torch.no_grad():
        expected, got = up(x), SubpixelUpsample(up.conv)(x)
    assert got.shape == expected.shape == (2, cout, 2 * h, 2 * w)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_only_plain_upsamplers_are_fused() -> None:
    assert not fusable(Upsample2D(4, use_conv=False))
    assert not fusable(Upsample2D(4, use_conv_transpose=True))
    assert not fusable(Upsample2D(4, use_conv=True, kernel_size=5, padding=2))
    decoder = torch.nn.Sequential(Upsample2D(4, use_conv=True), torch.nn.ModuleList([Upsample2D(4, use_conv=True)]))
    assert fuse_upsamplers(decoder) == 2
    assert fuse_upsamplers(decoder) == 0  # already fused: nothing left


def demo_image(**options: str) -> np.ndarray:
    pipe = build_pipeline(Settings(device="cpu", malloc_tuning="off", **options))  # the embedded demo model
    return np.asarray(pipe(JOB).images[0]).astype(int)


@pytest.mark.parametrize(
    "options",
    [{}, {"vae_subpixel": "on", "channels_last_vae": "off"}, {"vae_subpixel": "off", "channels_last_vae": "on"}],
    ids=["cpu-defaults", "subpixel", "channels-last"],
)
def test_cpu_vae_options_stay_within_parity_tolerance(options: dict[str, str]) -> None:
    plain = demo_image(vae_subpixel="off", channels_last_vae="off", vae_inplace="off")
    diff = np.abs(demo_image(**options) - plain)
    assert diff.max() <= PARITY_LEVELS, (diff.max(), (diff > 0).mean())


def test_cpu_defaults_turn_both_on() -> None:
    pipe = build_pipeline(Settings(device="cpu", malloc_tuning="off"))
    decoder = pipe.vae.decoder
    assert any(isinstance(m, SubpixelUpsample) for m in decoder.modules())
    assert not any(fusable(m) for m in decoder.modules())
    assert decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    wide = dataclasses.replace(JOB, width=320, height=192)  # not square: phases interleave along both axes
    assert pipe(wide).images[0].size == (320, 192)
