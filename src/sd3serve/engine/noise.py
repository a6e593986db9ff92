"""Per-image noise: every draw of a batch comes from that image's own generator.

Image ``i`` of a request uses seed ``seed + i`` and draws all its noise (the initial latent and every
stochastic sampler step) from its own generator, in the same order whatever the batch, so image ``i`` of a
batch equals the single request with ``seed + i``.
"""

from __future__ import annotations

import torch


class BatchNoise:
    """Gaussian noise for a batch, one generator per image, created lazily per device.

    ``noise(x)`` draws on the CPU and moves the result to ``x``'s device (ComfyUI's default: identical images on
    any hardware); ``noise(x, on_device=True)`` draws on ``x``'s device (the ``*_gpu`` samplers).
    """

    def __init__(self, seeds: list[int]) -> None:
        self.seeds = list(seeds)
        self._generators: dict[str, list[torch.Generator]] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def generators(self, device: torch.device | str = "cpu") -> list[torch.Generator]:
        key = str(torch.device(device))
        if key not in self._generators:
            self._generators[key] = [torch.Generator(device=key).manual_seed(s) for s in self.seeds]
        return self._generators[key]

    def __call__(self, like: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` (batch first), in ``like``'s dtype and device."""
        if like.shape[0] != len(self.seeds):
            raise ValueError(f"noise for a batch of {like.shape[0]} but {len(self.seeds)} seeds")
        device = like.device if on_device else torch.device("cpu")
        per_image = [
            torch.randn(like.shape[1:], generator=g, device=device, dtype=torch.float32)
            for g in self.generators(device)
        ]
        return torch.stack(per_image).to(device=like.device, dtype=like.dtype)
