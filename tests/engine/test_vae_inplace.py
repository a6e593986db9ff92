"""The VAE decoder's in-place resnet blocks compute diffusers' blocks bit for bit, and are used only where they
can be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D

from helpers.jobs import make_job
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.engine.vae_inplace import InplaceResnet, inplace_resnets, replaceable
from sd3serve.settings import Settings

JOB = make_job(
    prompt="a green square at the left on a yellow background", steps=2, seed=5, sampler="dpmpp_2m",
    scheduler="sgm_uniform", width=192, height=256,
)  # fmt: skip


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
@pytest.mark.parametrize(("cin", "cout"), [(8, 8), (16, 8)], ids=["identity-shortcut", "conv-shortcut"])
def test_inplace_resnet_is_bit_identical(channels_last: bool, cin: int, cout: int) -> None:
    torch.manual_seed(0)
    block = ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=None, groups=1).eval()
    assert replaceable(block)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, cin, 9, 13).contiguous(memory_format=fmt)
    block = block.to(memory_format=fmt)
    with torch.no_grad():
        expected = block(x, None)
        kept = x.clone()
        got = InplaceResnet(block)(x, temb=None)
    assert torch.equal(got, expected)
    assert torch.equal(x, kept)  # the block's input is left alone


def test_only_plain_blocks_are_replaced() -> None:
    assert not replaceable(ResnetBlock2D(in_channels=8, temb_channels=16, groups=1))  # a time embedding
    assert not replaceable(ResnetBlock2D(in_channels=8, temb_channels=None, groups=1, up=True))
    assert not replaceable(ResnetBlock2D(in_channels=8, temb_channels=None, groups=1, output_scale_factor=2.0))
    assert not replaceable(ResnetBlock2D(in_channels=8, temb_channels=None, groups=1, non_linearity="mish"))
    decoder = torch.nn.ModuleList([ResnetBlock2D(in_channels=8, temb_channels=None, groups=1)])
    assert inplace_resnets(decoder) == 1
    assert inplace_resnets(decoder) == 0  # already replaced


def demo_image(**options: str) -> np.ndarray:
    pipe = build_pipeline(Settings(device="cpu", malloc_tuning="off", **options))  # the embedded demo model
    return np.asarray(pipe(JOB).images[0])


@pytest.mark.parametrize("vae_subpixel", ["off", "on"])
def test_demo_pixels_are_bit_identical(vae_subpixel: str) -> None:
    options = {"vae_subpixel": vae_subpixel, "channels_last_vae": "off"}
    plain, inplace = demo_image(vae_inplace="off", **options), demo_image(vae_inplace="on", **options)
    assert np.array_equal(plain, inplace)


def test_cpu_default_replaces_the_decoder_blocks() -> None:
    decoder = build_pipeline(Settings(device="cpu", malloc_tuning="off")).vae.decoder
    assert any(isinstance(m, InplaceResnet) for m in decoder.modules())
    assert not any(isinstance(m, ResnetBlock2D) for m in decoder.modules())
