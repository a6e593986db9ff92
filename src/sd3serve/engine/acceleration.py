"""Speed and memory options, each switchable on its own (settings) and measured by bench/gpu.py.

- ``fuse_qkv``: one projection for Q, K and V (and for the context stream's) in every joint-attention block.
- ``compile``: ``torch.compile`` per transformer block ("regional": the 38 identical blocks compile once and
  share the code, compile time stays short) or of the whole transformer ("full"); static shapes per request size.
- ``channels_last_vae``: NHWC memory format for the VAE decoder's convolutions (faster cuDNN kernels).
- ``vae_tiling``: decode in overlapping tiles so that 2048² fits in little memory.
- ``offload``: "model" keeps each component in CPU memory until it runs (accelerate hooks), "sequential" streams
  weights layer by layer (slowest, smallest). CUDA only.
Attention uses PyTorch's SDPA, which picks the fastest available backend (flash / memory-efficient / cuDNN).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings

log = logging.getLogger(__name__)


def _wanted(choice: Literal["auto", "on", "off"], device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def apply_acceleration(model: LoadedModel, settings: Settings) -> list[str]:
    """Apply the options to the loaded model in place; returns what was turned on, for the log."""
    pipe, device, applied = model.pipe, model.device, []
    if _wanted(settings.fuse_qkv, device):
        pipe.transformer.fuse_qkv_projections()
        applied.append("fused QKV")
    if _wanted(settings.channels_last_vae, device):
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels-last VAE")
    if settings.vae_tiling != "off":
        applied.append(f"VAE tiling ({settings.vae_tiling}; the pipeline switches it per size)")
    if settings.compile == "regional":
        for block in pipe.transformer.transformer_blocks:
            block.compile(fullgraph=True, dynamic=False)
        applied.append("torch.compile (regional)")
    elif settings.compile == "full":
        pipe.transformer.compile(fullgraph=True, dynamic=False)
        applied.append("torch.compile (full)")
    if settings.offload != "none":
        if device.type != "cuda":
            raise ValueError("offload needs a CUDA device: on the CPU every component already lives in memory")
        if settings.offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        applied.append(f"{settings.offload} CPU offload")
    if applied:
        log.info("acceleration: %s", ", ".join(applied))
    return applied
