"""Per-image noise streams, drawn as ComfyUI draws them: the same seed gives ComfyUI's noise.

Image ``i`` of a request uses seed ``seed + i`` and has its own streams, so image ``i`` of a batch equals the
single request with ``seed + i``. For one image with seed ``s`` (ComfyUI's KSampler on the CPU):

* start noise: ``randn`` of the latent's shape from a CPU generator seeded with ``s`` (``prepare_noise``);
* step noise of the ancestral / stochastic samplers: a second CPU generator seeded with ``s + 1``, one
  ``randn`` of the latent's shape per draw (``default_noise_sampler`` on the CPU);
* dpmpp_sde and the dpmpp_2m/3m SDE samplers: a Brownian tree over [σ_min, σ_max] with entropy ``s``
  (``BrownianTreeNoiseSampler``, torchsde), whose draw for a step σ → σ' is the normalised increment
  ``(W(σ') - W(σ)) / sqrt|σ' - σ|``: the draws of one step (dpmpp_sde's two stages) are increments of one path.
  The ``*_gpu`` samplers grow the tree on the compute device (the same numbers on the CPU).

Every draw is float32 and, except the ``*_gpu`` trees, made on the CPU, so the images are the same on any
hardware.
"""

from __future__ import annotations

import warnings

import torch
import torchsde


class _ImageNoise:
    """One image's generators, created lazily: start noise per device, step noise on the CPU."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.start: dict[str, torch.Generator] = {}
        self._step: torch.Generator | None = None

    def start_generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self.start:
            self.start[key] = torch.Generator(device=key).manual_seed(self.seed)
        return self.start[key]

    def step_generator(self) -> torch.Generator:
        if self._step is None:
            self._step = torch.Generator().manual_seed(self.seed + 1)  # ComfyUI: seed + 1 for a CPU generator
        return self._step


class BatchNoise:
    """Gaussian noise for a batch, one set of streams per image.

    ``noise(x)`` is the start noise (drawn on the CPU, moved to ``x``'s device); ``noise.step(x)`` one draw of
    step noise; ``noise.brownian(x, σ_min, σ_max)`` the Brownian-tree sampler of the SDE samplers;
    ``noise.rows(idx)`` the same streams for a subset of the images (draws advance the shared generators).
    """

    def __init__(self, seeds: list[int] | None = None, *, _images: list[_ImageNoise] | None = None) -> None:
        self._images = _images if _images is not None else [_ImageNoise(s) for s in seeds or []]

    @property
    def seeds(self) -> list[int]:
        return [im.seed for im in self._images]

    def __len__(self) -> int:
        return len(self._images)

    def rows(self, indices: list[int]) -> BatchNoise:
        """The streams of images ``indices``, shared with this batch."""
        return BatchNoise(_images=[self._images[i] for i in indices])

    def generators(self, device: torch.device | str = "cpu") -> list[torch.Generator]:
        """The start-noise generators, one per image."""
        return [im.start_generator(torch.device(device)) for im in self._images]

    def _check(self, like: torch.Tensor) -> None:
        if like.shape[0] != len(self._images):
            raise ValueError(f"noise for a batch of {like.shape[0]} but {len(self._images)} seeds")

    def __call__(self, like: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        """Start noise shaped like ``like`` (batch first), in ``like``'s dtype and device."""
        self._check(like)
        device = like.device if on_device else torch.device("cpu")
        per_image = [
            torch.randn(like.shape[1:], generator=g, device=device, dtype=torch.float32)
            for g in self.generators(device)
        ]
        return torch.stack(per_image).to(device=like.device, dtype=like.dtype)

    def step(self, like: torch.Tensor) -> torch.Tensor:
        """One draw of step noise per image, shaped like ``like``, from each image's second CPU generator."""
        self._check(like)
        per_image = [
            torch.randn((1, *like.shape[1:]), generator=im.step_generator(), dtype=torch.float32)
            for im in self._images
        ]
        return torch.cat(per_image).to(device=like.device, dtype=like.dtype)

    def brownian(
        self, like: torch.Tensor, sigma_min: float, sigma_max: float, *, on_device: bool = False
    ) -> BrownianNoise:
        """A Brownian-tree noise sampler over [σ_min, σ_max], one tree per image."""
        self._check(like)
        return BrownianNoise(like, self.seeds, sigma_min, sigma_max, on_device=on_device)


class BrownianNoise:
    """``noise(σ, σ')``: per image, ``(W(σ') - W(σ)) / sqrt|σ' - σ|`` of a Brownian path fixed by the seed.

    The path lives on [σ_min, σ_max] (float32 end points, as ComfyUI passes its schedule's), one torchsde
    ``BrownianTree`` per image with ``entropy=seed`` and the shape of one image (batch dimension 1).
    """

    def __init__(
        self, like: torch.Tensor, seeds: list[int], sigma_min: float, sigma_max: float, *, on_device: bool = False
    ) -> None:
        self.like, self.seeds, self.range = like, seeds, (sigma_min, sigma_max)
        self.device = like.device if on_device else torch.device("cpu")
        self._trees: list[torchsde.BrownianTree] | None = None

    def _grow(self) -> list[torchsde.BrownianTree]:
        # lazily: a schedule with a single positive σ has an empty interval, and never asks for noise
        if self._trees is None:
            t0, t1 = (torch.tensor(t, dtype=torch.float32, device=self.device) for t in self.range)
            w0 = torch.zeros((1, *self.like.shape[1:]), dtype=torch.float32, device=self.device)
            self._trees = [torchsde.BrownianTree(t0, w0, t1, entropy=s) for s in self.seeds]
        return self._trees

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        s = torch.tensor(sigma, dtype=torch.float32, device=self.device)
        s_next = torch.tensor(sigma_next, dtype=torch.float32, device=self.device)
        lo, hi, sign = (s, s_next, 1.0) if s < s_next else (s_next, s, -1.0)
        with warnings.catch_warnings():
            # torchsde rounds the tree's end points and clamps queries at σ_min to them, warning each time
            warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
            w = torch.cat([tree(lo, hi) for tree in self._grow()]) * sign
        return (w / (s_next - s).abs().sqrt()).to(device=self.like.device, dtype=self.like.dtype)
