"""Live previews: the x0 estimate of each step as a small RGB picture, without the VAE.

As ComfyUI's latent previews: a linear map per model family takes each latent cell (C channels, in the model's
latent space) to RGB in [-1, 1], ``rgb = x0 · W + b`` with W of shape (C, 3); one pixel per latent cell. SD3's
numbers are the published ones; the demo model's are fitted from its own VAE (``tools/sd3demo/latent_rgb.py``,
stored next to the model in ``models/demo/latent_rgb.json``); any other latent layout gets a map fitted from its
VAE on first use.

The pipeline asks :class:`PreviewHook` which rows of the batch want a preview; when none does, nothing is computed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sd3serve.engine.model import LoadedModel

DEMO_MAP = Path(__file__).resolve().parent.parent / "models" / "demo" / "latent_rgb.json"
FIT_SAMPLES = 8  # latents decoded to fit a map for an unknown latent layout
FIT_SIDE = 16  # their side, in latent cells

# SD3 / SD3.5 (16 channels, after (z - shift) · scale): the factors and bias ComfyUI publishes for its SD3 previews.
SD3_WEIGHT = (
    (-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458), (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309), (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669), (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
    (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293), (-0.1448, -0.1463, -0.1189),
)  # fmt: skip
SD3_BIAS = (0.2394, 0.2135, 0.1925)


@dataclass(frozen=True)
class LatentRGB:
    """A latent→RGB linear map: ``weight`` (C, 3), ``bias`` (3,), RGB in [-1, 1]."""

    weight: tuple[tuple[float, ...], ...]
    bias: tuple[float, ...]

    @property
    def channels(self) -> int:
        return len(self.weight)

    def linear(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, 3, h, w) in [-1, 1] (not clamped)."""
        w = torch.tensor(self.weight, dtype=torch.float32, device=x0.device)
        b = torch.tensor(self.bias, dtype=torch.float32, device=x0.device)
        return torch.einsum("bchw,cr->brhw", x0.float(), w) + b.view(1, 3, 1, 1)

    def pixels(self, x0: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, 3, h, w) uint8, on x0's device."""
        return ((self.linear(x0) + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)

    def to_json(self) -> str:
        return json.dumps({"weight": [list(r) for r in self.weight], "bias": list(self.bias)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> LatentRGB:
        d = json.loads(text)
        weight = tuple(tuple(float(v) for v in row) for row in d["weight"])
        return cls(weight=weight, bias=tuple(float(v) for v in d["bias"]))


SD3 = LatentRGB(weight=SD3_WEIGHT, bias=SD3_BIAS)


def fit(latents: torch.Tensor, rgb: torch.Tensor) -> LatentRGB:
    """The least-squares map from latents (N, C, h, w) to RGB (N, 3, h, w) in [-1, 1] at the latents' grid."""
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).double()
    y = rgb.permute(0, 2, 3, 1).reshape(-1, 3).double()
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (C + 1, 3)
    weight = tuple(tuple(round(float(v), 5) for v in row) for row in solution[:-1])
    return LatentRGB(weight=weight, bias=tuple(round(float(v), 5) for v in solution[-1]))


@torch.no_grad()
def decoded_at_latent_grid(model: LoadedModel, latents: torch.Tensor) -> torch.Tensor:
    """What the VAE makes of model-space latents (N, C, h, w), averaged over each latent cell: (N, 3, h, w), [-1, 1]."""
    vae = model.pipe.vae
    shift = vae.config.shift_factor or 0.0  # SD3's VAE has one; an SD1-style VAE none
    z = (latents / vae.config.scaling_factor + shift).to(device=model.device, dtype=model.dtype)
    pixels = vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)
    return F.avg_pool2d(pixels, model.vae_scale_factor).cpu()


def fit_from_vae(model: LoadedModel, latents: torch.Tensor) -> LatentRGB:
    """The map that best predicts the VAE's decode of these model-space latents."""
    return fit(latents.float().cpu(), decoded_at_latent_grid(model, latents))


def latent_rgb_for(model: LoadedModel) -> LatentRGB:
    """The map of this model's family: the demo's fitted one, SD3's, or one fitted now from random latents."""
    channels = int(model.pipe.transformer.config.in_channels)
    if model.normalise_prompts and DEMO_MAP.exists():  # the embedded demo model
        return LatentRGB.from_json(DEMO_MAP.read_text())
    if channels == SD3.channels:
        return SD3
    g = torch.Generator().manual_seed(0)
    return fit_from_vae(model, torch.randn(FIT_SAMPLES, channels, FIT_SIDE, FIT_SIDE, generator=g))


@dataclass(frozen=True)
class PreviewHook:
    """How a batch's previews leave the pipeline: ``rows()`` the batch rows that want one now (asked at every model
    call, so it must be cheap; empty: nothing is computed), ``put(row, step, steps, rgb)`` each one's picture after a
    step, (h, w, 3) uint8, on the engine's thread (it must return at once)."""

    rows: Callable[[], Sequence[int]]
    put: Callable[[int, int, int, np.ndarray], None]


class X0Tap:
    """Keeps the latest x0 estimate of the rows that want a preview, as RGB at the latent grid (computed on the
    device at each model call, moved to the host once per step by ``flush``)."""

    def __init__(self, hook: PreviewHook, latent_rgb: LatentRGB) -> None:
        self.hook = hook
        self.latent_rgb = latent_rgb
        self._latest: dict[int, torch.Tensor] = {}  # row → (3, h, w) uint8

    def seen(self, x0: torch.Tensor, rows: Sequence[int] | None) -> None:
        """A model call's guided x0; ``rows``: the batch rows its rows are (None: all, in order)."""
        wanted = self.hook.rows()
        if not wanted:
            return
        index = list(range(x0.shape[0])) if rows is None else list(rows)
        pick = [(pos, row) for pos, row in enumerate(index) if row in wanted]
        if pick:
            rgb = self.latent_rgb.pixels(x0[[pos for pos, _ in pick]].detach())
            for k, (_, row) in enumerate(pick):
                self._latest[row] = rgb[k]

    def flush(self, step: int, steps: int) -> None:
        """Hand over the pictures seen since the last flush."""
        latest, self._latest = self._latest, {}
        for row, rgb in latest.items():
            self.hook.put(row, step, steps, rgb.permute(1, 2, 0).cpu().numpy())
