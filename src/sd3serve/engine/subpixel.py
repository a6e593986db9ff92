"""The VAE decoder's upsamplers as one transposed convolution on the coarse grid (a sub-pixel convolution).

diffusers' ``Upsample2D`` repeats every pixel 2×2 (nearest) and runs a 3×3 convolution over the result. Along
each axis, output pixel 2i sees the coarse pixels i-1 and i (taps w0 and w1 + w2), and output pixel 2i+1 sees
i and i+1 (taps w0 + w1 and w2): the whole layer is a transposed convolution of the coarse image with stride 2,
padding 1 and the 4×4 kernel whose taps along each axis are (w2, w1 + w2, w0 + w1, w0). One such call writes the
interleaved output directly, with 16 instead of 36 multiply-adds per coarse pixel and channel pair and without
the 4× larger repeated image. Only the order of the additions changes (float rounding: a decoded image differs by
at most a level on a few pixels; tests/engine/test_subpixel.py bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _transposed_taps(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Along ``dim`` (of size 3): the four taps (w2, w1 + w2, w0 + w1, w0) of the stride-2 transposed kernel."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t2, t1 + t2, t0 + t1, t0), dim)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3×3 convolution's weight (O, I, 3, 3) → the weight (I, O, 4, 4) of the transposed convolution that
    computes nearest 2× upsampling followed by it."""
    return _transposed_taps(_transposed_taps(weight, 2), 3).transpose(0, 1).contiguous()


class SubpixelUpsample(nn.Module):
    """Nearest 2× upsampling then a 3×3 convolution (padding 1), computed on the coarse grid."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(subpixel_weight(conv.weight.detach()), requires_grad=False)
        self.bias = nn.Parameter(conv.bias.detach(), requires_grad=False) if conv.bias is not None else None

    def forward(self, x: torch.Tensor, output_size: object = None, *args: object, **kwargs: object) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv_transpose2d(x, self.weight.to(x.dtype), bias, stride=2, padding=1)


def fusable(module: nn.Module) -> bool:
    """A plain Upsample2D: nearest 2× interpolation, a 3×3 convolution with padding 1, no norm."""
    if not isinstance(module, Upsample2D) or module.norm is not None or module.use_conv_transpose:
        return False
    conv = getattr(module, "conv", None)
    return (
        module.interpolate
        and isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
    )


def fuse_upsamplers(decoder: nn.Module) -> int:
    """Replace every fusable Upsample2D in ``decoder`` by its SubpixelUpsample; returns how many."""
    count = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if fusable(child):
                assert isinstance(child, Upsample2D) and isinstance(child.conv, nn.Conv2d)
                setattr(parent, name, SubpixelUpsample(child.conv))
                count += 1
    return count
