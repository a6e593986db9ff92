"""Sampler benchmark: accuracy against the exact Gaussian flow, model calls per step, bookkeeping overhead.

    python bench/samplers.py            # ~1 min on 2 CPU cores

1. Data N(μ, s²) per dimension has a closed-form denoiser and ODE solution (tests/engine/conftest.py). For each
   sampler and step count (sgm_uniform, shift 3, as the server runs) it prints the RMS error of the final latent
   against the exact ODE endpoint; stochastic samplers (marked ~) follow no ODE path, so for them it prints the
   distribution error |mean - μ| + |std - s| of 37k samples instead.
2. The sampler's own cost per model call (a denoiser that costs nothing, noise draws excluded) against one
   forward of the tiny SD3 model at 1024x1024 (latent 16x128x128).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # helpers.denoisers
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the demo model's tooling: sd3demo
from helpers.denoisers import GaussianDenoiser, exact_flow
from sd3serve.catalogue import SAMPLER_NAMES, STOCHASTIC_SAMPLERS
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.noise import BatchNoise, BrownianNoise
from sd3serve.engine.samplers import SAMPLERS
from sd3serve.engine.schedules import get_sigmas

STEPS = (4, 8, 16, 32)
MU, S = 0.5, 1.0


def accuracy_table() -> None:
    ms = FlowSampling(3.0)
    noise0 = BatchNoise([0])
    eps = noise0(torch.empty(1, 4, 96, 96, dtype=torch.float64))
    exact = exact_flow(eps, 0.0, MU, S)
    print(f"Error against the exact solution, data N({MU}, {S}²), sgm_uniform, shift 3 (~ = distribution error)")
    print(f"| {'sampler':26s} | " + " | ".join(f"{n:>2d} steps" for n in STEPS) + " | calls/step |")
    print(f"|{'-' * 28}|" + "|".join("-" * 10 for _ in STEPS) + "|------------|")
    for name in SAMPLER_NAMES:
        cells, calls = [], 0.0
        for n in STEPS:
            sigmas = get_sigmas("sgm_uniform", ms, n).double()
            model = GaussianDenoiser(MU, S)
            out = SAMPLERS[name](model, eps.clone(), sigmas, noise=BatchNoise([0]))
            if name in STOCHASTIC_SAMPLERS:
                err = abs(out.mean().item() - MU) + abs(out.std().item() - S)
                cells.append(f"~{err:8.2e}")
            else:
                cells.append(f"{(out - exact).pow(2).mean().sqrt().item():9.2e}")
            if n == 8:
                calls = model.calls / n
        print(f"| {name:26s} | " + " | ".join(cells) + f" | {calls:10.2f} |")


class FreeDenoiser:
    """Costs (almost) nothing: isolates the sampler's own per-step work."""

    def __init__(self, x: torch.Tensor) -> None:
        self.out = x * 0.5

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.out

    def with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.out, self.out

    def rows(self, indices: list[int]) -> FreeDenoiser:
        return self


class CachedNoise(BatchNoise):
    """Hands out one pre-drawn tensor: takes the cost of the draws (the algorithm's, not bookkeeping) out."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__([0] * like.shape[0])
        self.eps = torch.randn_like(like)

    def __call__(self, like: torch.Tensor, *, on_device: bool = False) -> torch.Tensor:
        return self.eps

    def step(self, like: torch.Tensor) -> torch.Tensor:
        return self.eps

    def brownian(
        self, like: torch.Tensor, sigma_min: float, sigma_max: float, *, on_device: bool = False
    ) -> BrownianNoise:
        eps = self.eps

        class Cached(BrownianNoise):
            def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
                return eps

        return Cached(like, self.seeds, sigma_min, sigma_max)


def overhead_table() -> None:
    from diffusers import SD3Transformer2DModel

    from sd3demo.tiny import build_tiny_sd3

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_sd3(Path(tmp))
        transformer = SD3Transformer2DModel.from_pretrained(Path(tmp) / "transformer").eval()
    cfg = transformer.config
    x = torch.randn(1, cfg.in_channels, 128, 128)  # a 1024x1024 image's latent (SD3.5 Turbo's native size)
    ctx, pooled = torch.randn(1, 77, cfg.joint_attention_dim), torch.randn(1, cfg.pooled_projection_dim)

    @torch.no_grad()
    def forward() -> torch.Tensor:
        out: torch.Tensor = transformer(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=torch.tensor([500.0])
        ).sample
        return out

    forward()
    reps = 5
    t_model = math.inf  # minimum over repeats throughout: the machine may be shared
    for _ in range(reps):
        t0 = time.perf_counter()
        forward()
        t_model = min(t_model, time.perf_counter() - t0)
    t_noise = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        BatchNoise([0])(x)
        t_noise = min(t_noise, time.perf_counter() - t0)
    print(f"\nTiny SD3 transformer, latent {tuple(x.shape)}: {t_model * 1e3:.2f} ms per model call (best of 5)")
    print(f"One noise draw for that latent (stochastic samplers, 1-2 per step): {t_noise * 1e3:.2f} ms")
    print("Sampler bookkeeping per model call (free denoiser, noise draws excluded, 32 steps, best of 10),")
    print("and its ratio to one model call:")
    sigmas = get_sigmas("sgm_uniform", FlowSampling(3.0), 32)
    calls = {}
    for name in SAMPLER_NAMES:
        model = GaussianDenoiser(0.0, 1.0)  # only to count calls
        SAMPLERS[name](model, x.clone(), sigmas, noise=BatchNoise([0]))
        calls[name] = model.calls
    free, cached = FreeDenoiser(x), CachedNoise(x)
    best = dict.fromkeys(SAMPLER_NAMES, math.inf)
    for _ in range(10):  # rounds over all samplers, so that load from elsewhere hits them alike
        for name in SAMPLER_NAMES:
            t0 = time.perf_counter()
            SAMPLERS[name](free, x.clone(), sigmas, noise=cached)
            best[name] = min(best[name], time.perf_counter() - t0)
        t0 = time.perf_counter()
        forward()
        t_model = min(t_model, time.perf_counter() - t0)
    worst = 0.0
    rows = []
    for name in SAMPLER_NAMES:
        per_call = best[name] / calls[name]
        ratio = per_call / t_model
        worst = max(worst, ratio)
        rows.append(f"{name}: {per_call * 1e6:.0f} us ({ratio:.2%})")
    print(f"Tiny SD3 transformer, best of 15: {t_model * 1e3:.2f} ms per model call")
    for i in range(0, len(rows), 3):
        print("  " + " | ".join(rows[i : i + 3]))
    print(f"Worst bookkeeping / model-step ratio: {worst:.2%} (must be < 1%)")


if __name__ == "__main__":
    accuracy_table()
    overhead_table()
