"""The VAE decoder's resnet blocks without the passes over memory that their results do not need.

diffusers' ``ResnetBlock2D`` (as a VAE uses it: no time embedding, no resampling, output scale 1) allocates a new
tensor for each SiLU, for the residual sum and for its division by 1. Each of those tensors is the size of the
block's activations (32 MB at the demo's 1024², where the decoder is bound by memory traffic rather than by
arithmetic): here the SiLUs act on the norms' fresh outputs in place, the shortcut is added into the second
convolution's fresh output, and the division by 1 is left out. Every value is computed by the same operations as in
diffusers (a sum's operands swap places, which float addition does not notice): the pixels are bit-identical
(tests/engine/test_vae_inplace.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.resnet import ResnetBlock2D
from torch import nn


class InplaceResnet(nn.Module):
    """A plain ResnetBlock2D's forward, with SiLU and the residual sum in place on tensors it made itself."""

    def __init__(self, block: ResnetBlock2D) -> None:
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2 = block.norm1, block.conv1, block.norm2, block.conv2
        self.conv_shortcut = block.conv_shortcut

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:  # temb: None in a VAE
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))


def replaceable(module: nn.Module) -> bool:
    """A ResnetBlock2D whose forward is norm, SiLU, conv, norm, SiLU, conv, plus the (projected) input."""
    return (
        isinstance(module, ResnetBlock2D)
        and module.upsample is None
        and module.downsample is None
        and module.time_emb_proj is None
        and module.output_scale_factor == 1.0
        and module.dropout.p == 0.0
        and isinstance(module.nonlinearity, nn.SiLU)
        and isinstance(module.norm1, nn.GroupNorm)  # a fresh output: SiLU may overwrite it
        and isinstance(module.norm2, nn.GroupNorm)
        and module.conv2.out_channels == module.out_channels
        and (module.conv_shortcut is not None or module.in_channels == module.out_channels)
    )


def inplace_resnets(decoder: nn.Module) -> int:
    """Replace every replaceable ResnetBlock2D in ``decoder`` by its InplaceResnet, and run the output SiLU in place
    after its GroupNorm; returns how many blocks."""
    count = 0
    for parent in list(decoder.modules()):
        for name, child in list(parent.named_children()):
            if replaceable(child):
                assert isinstance(child, ResnetBlock2D)
                setattr(parent, name, InplaceResnet(child))
                count += 1
    act, norm = getattr(decoder, "conv_act", None), getattr(decoder, "conv_norm_out", None)
    if isinstance(act, nn.SiLU) and isinstance(norm, nn.GroupNorm):
        act.inplace = True
    return count
