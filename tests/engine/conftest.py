"""A denoiser whose answer is known: data N(μ, s²) per dimension under the rectified flow x_σ = (1-σ)x0 + σε."""

from __future__ import annotations

import math

import torch


class GaussianDenoiser:
    """Exact E[x0 | x_σ] for x0 ~ N(μ, s²); with ``mu_uncond`` it also plays an unconditional model for CFG."""

    def __init__(
        self,
        mu: float | torch.Tensor,
        s: float,
        *,
        mu_uncond: float | torch.Tensor | None = None,
        guidance: float = 1.0,
    ) -> None:
        self.mu, self.s, self.mu_uncond, self.guidance = mu, s, mu_uncond, guidance
        self.calls = 0

    def _x0(self, x: torch.Tensor, sigma: torch.Tensor, mu: float | torch.Tensor) -> torch.Tensor:
        sig = float(sigma)
        a = 1.0 - sig
        gain = a * self.s**2 / (a * a * self.s**2 + sig * sig)
        return mu + gain * (x - a * mu)

    def with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        cond = self._x0(x, sigma, self.mu)
        if self.mu_uncond is None or self.guidance <= 1:
            return cond, cond
        uncond = self._x0(x, sigma, self.mu_uncond)
        return uncond + self.guidance * (cond - uncond), uncond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.with_uncond(x, sigma)[0]


def exact_flow(eps: torch.Tensor, sigma: float, mu: float, s: float) -> torch.Tensor:
    """The probability-flow ODE solution from ε at σ = 1: x(σ) = (1-σ)μ + sqrt((1-σ)²s² + σ²)·ε."""
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2) * eps
