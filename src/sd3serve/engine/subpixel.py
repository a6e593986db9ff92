"""The VAE decoder's upsamplers as one small convolution on the coarse grid (a sub-pixel convolution).

diffusers' ``Upsample2D`` repeats every pixel 2×2 (nearest) and runs a 3×3 convolution over the result. Each of
the four output pixels of a repeated block sees only a 2×2 neighbourhood of the coarse image, with some of the 3×3
taps landing on the same coarse pixel: phase (a, b) of the output is a 2×2 convolution of the coarse image whose
weights are sums of the 3×3 weights. Computing the four phases that way and interleaving them gives the same
pixels with 16 instead of 36 multiply-adds per coarse pixel and channel pair, and without the 4× larger repeated
image. Only the order of the additions changes (float rounding: a decoded image differs by at most a level on a
few pixels; tests/engine/test_subpixel.py bounds it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.upsampling import Upsample2D
from torch import nn


def _phase_taps(w: torch.Tensor, phase: int, dim: int) -> torch.Tensor:
    """Along ``dim`` (of size 3): the two taps of output phase 0 (w0, w1 + w2) or phase 1 (w0 + w1, w2)."""
    t0, t1, t2 = w.unbind(dim)
    taps = (t0, t1 + t2) if phase == 0 else (t0 + t1, t2)
    return torch.stack(taps, dim)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """(O, I, 3, 3) → (4·O, I, 2, 2): the 2×2 kernels of phases (0,0), (0,1), (1,0), (1,1), in that order."""
    kernels = [_phase_taps(_phase_taps(weight, a, 2), b, 3) for a in (0, 1) for b in (0, 1)]
    return torch.cat(kernels)


class SubpixelUpsample(nn.Module):
    """Nearest 2× upsampling then a 3×3 convolution (padding 1), computed on the coarse grid."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.out_channels = conv.out_channels
        self.weight = nn.Parameter(subpixel_weight(conv.weight.detach()), requires_grad=False)
        bias = conv.bias.detach().repeat(4) if conv.bias is not None else None
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor, output_size: object = None, *args: object, **kwargs: object) -> torch.Tensor:
        b, _, h, w = x.shape
        o = self.out_channels
        # windows starting at coarse rows -1..h-1 and columns -1..w-1: (B, 4·O, h+1, w+1)
        y = F.conv2d(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype), padding=1)
        if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
            y6 = y.permute(0, 2, 3, 1).view(b, h + 1, w + 1, 2, 2, o)  # NHWC, channels (a, b, O)
            rows = [torch.stack([y6[:, a : a + h, c : c + w, a, c] for c in (0, 1)], 3) for a in (0, 1)]
            return torch.stack(rows, 2).reshape(b, 2 * h, 2 * w, o).permute(0, 3, 1, 2)
        y6 = y.view(b, 2, 2, o, h + 1, w + 1)
        rows = [torch.stack([y6[:, a, c, :, a : a + h, c : c + w] for c in (0, 1)], -1) for a in (0, 1)]
        return torch.stack(rows, 3).reshape(b, o, 2 * h, 2 * w)


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
