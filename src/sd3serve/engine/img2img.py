"""Image-to-image: a start image, encoded by the VAE and noised to the first σ of a shortened schedule.

The semantics are ComfyUI's KSampler with ``denoise = strength``: the σ of a longer schedule of
``int(steps / strength)`` steps, of which the last ``steps + 1`` are run (strength ≥ 0.9999: the plain schedule;
strength 0: no step at all, the picture is the image's VAE round trip). The image is encoded to the mean of the
VAE's latent distribution, moved into the model's latent space (``(z - shift) · scale``), and noised as a rectified
flow: ``x = (1 - σ0)·x0 + σ0·ε``, with ε the same start noise a text-to-image request of that seed draws.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL

from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.init_image import InitImage
from sd3serve.engine.schedules import sampler_sigmas

FULL_DENOISE = 0.9999  # ComfyUI: a denoise above this runs the plain schedule
MAX_SCHEDULE = 10_000  # steps of the longer schedule at most (a tiny strength would ask for millions)


def img2img_sigmas(sampler: str, scheduler: str, flow: FlowSampling, steps: int, strength: float) -> torch.Tensor:
    """The σ an image-to-image request runs: ComfyUI's KSampler ``set_steps`` with ``denoise = strength``."""
    if strength > FULL_DENOISE:
        return sampler_sigmas(sampler, scheduler, flow, steps)
    if strength <= 0.0:
        return torch.zeros(0, dtype=torch.float32)
    longer = sampler_sigmas(sampler, scheduler, flow, min(MAX_SCHEDULE, int(steps / strength)))
    return longer[-(steps + 1) :]


def init_tensor(init: InitImage) -> torch.Tensor:
    """(3, H, W) in [-1, 1], float32: the VAE's input range."""
    arr = np.frombuffer(init.pixels, dtype=np.uint8).reshape(init.height, init.width, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, h, w) centred in (B, 3, height, width), the border replicated (the pipeline crops it away)."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    top, left = (height - h) // 2, (width - w) // 2
    pad = (left, width - w - left, top, height - h - top)
    return torch.nn.functional.pad(image, pad, mode="replicate")


@torch.no_grad()
def encode_init(vae: AutoencoderKL, init: InitImage, height: int, width: int, *, tiling: bool) -> torch.Tensor:
    """(1, C, h, w): the image padded to (height, width), encoded to its latent distribution's mean (as ComfyUI's
    VAE encode), in the model's latent space."""
    pixels = pad_to(init_tensor(init).unsqueeze(0), height, width).to(device=vae.device, dtype=vae.dtype)
    vae.use_tiling = tiling
    # a channels-last VAE gives a channels-last latent: the sampler must see the contiguous layout txt2img's noise has
    z = vae.encode(pixels).latent_dist.mode().float().contiguous()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def noised(latent: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified flow's x_σ = (1 - σ)·x0 + σ·ε."""
    return (1 - sigma) * latent + sigma * eps
