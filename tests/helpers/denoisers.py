"""Denoisers whose answer is known, under the rectified flow x_σ = (1-σ)x0 + σε: Gaussian data N(μ, s²) per
dimension (closed-form ODE solution) and a two-component Gaussian mixture (non-linear in x)."""

from __future__ import annotations

import math

import torch

from sd3serve.engine.noise import BatchNoise, BrownianNoise

Params = float | torch.Tensor | tuple[float, ...]


def _pick(value: Params | None, indices: list[int]) -> Params | None:
    """A per-row parameter (a tensor with a batch dimension > 1) restricted to ``indices``; others as they are."""
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] > 1:
        return value[indices]
    return value


class _KnownDenoiser:
    """Exact E[x0 | x_σ] for the data of ``cond``; with ``uncond`` it also plays the negative prompt's model.

    As ComfyUI: a plain call at guidance 1 uses only the prompt; ``with_uncond`` (CFG++) always evaluates the
    negative side when there is one. ``calls`` counts evaluations (``rows`` views count into their parent's).
    """

    def __init__(self, cond: Params, uncond: Params | None, guidance: float, counter: list[int] | None) -> None:
        self.cond, self.uncond, self.guidance = cond, uncond, guidance
        self._counter = counter if counter is not None else [0]

    @property
    def calls(self) -> int:
        return self._counter[0]

    def _x0(self, x: torch.Tensor, sigma: float, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def _view(self, cond: Params, uncond: Params | None) -> _KnownDenoiser:
        raise NotImplementedError

    def with_uncond(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._counter[0] += 1
        cond = self._x0(x, float(sigma), self.cond)
        if self.uncond is None:
            return cond, cond
        uncond = self._x0(x, float(sigma), self.uncond)
        return uncond + self.guidance * (cond - uncond), uncond

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.uncond is None or math.isclose(self.guidance, 1.0):
            self._counter[0] += 1
            return self._x0(x, float(sigma), self.cond)
        return self.with_uncond(x, sigma)[0]

    def rows(self, indices: list[int]) -> _KnownDenoiser:
        cond = _pick(self.cond, indices)
        assert cond is not None
        return self._view(cond, _pick(self.uncond, indices))


class GaussianDenoiser(_KnownDenoiser):
    """Data N(μ, s²) per dimension; ``mu_uncond`` is the negative prompt's mean."""

    def __init__(
        self,
        mu: float | torch.Tensor,
        s: float,
        *,
        mu_uncond: float | torch.Tensor | None = None,
        guidance: float = 1.0,
        _counter: list[int] | None = None,
    ) -> None:
        super().__init__(mu, mu_uncond, guidance, _counter)
        self.mu, self.s, self.mu_uncond = mu, s, mu_uncond

    def _x0(self, x: torch.Tensor, sigma: float, params: Params) -> torch.Tensor:
        assert not isinstance(params, tuple)
        a = 1.0 - sigma
        gain = a * self.s**2 / (a * a * self.s**2 + sigma * sigma)
        return params + gain * (x - a * params)

    def _view(self, cond: Params, uncond: Params | None) -> GaussianDenoiser:
        assert not isinstance(cond, tuple) and not isinstance(uncond, tuple)
        return GaussianDenoiser(cond, self.s, mu_uncond=uncond, guidance=self.guidance, _counter=self._counter)


class MixtureDenoiser(_KnownDenoiser):
    """Data ½N(m₁, s²) + ½N(m₂, s²) per dimension: the posterior mean is a softmax-weighted blend, non-linear in x."""

    def __init__(
        self,
        means: tuple[float, float],
        s: float,
        *,
        means_uncond: tuple[float, float] | None = None,
        guidance: float = 1.0,
        _counter: list[int] | None = None,
    ) -> None:
        super().__init__(means, means_uncond, guidance, _counter)
        self.s = s

    def _x0(self, x: torch.Tensor, sigma: float, params: Params) -> torch.Tensor:
        assert isinstance(params, tuple)
        a = 1.0 - sigma
        var = a * a * self.s**2 + sigma * sigma
        gain = a * self.s**2 / var
        logits = torch.stack([-((x - a * m) ** 2) / (2 * var) for m in params])
        weights = torch.softmax(logits, dim=0)
        return sum((w * (m + gain * (x - a * m)) for w, m in zip(weights, params, strict=True)), torch.zeros_like(x))

    def _view(self, cond: Params, uncond: Params | None) -> MixtureDenoiser:
        assert isinstance(cond, tuple) and (uncond is None or isinstance(uncond, tuple))
        return MixtureDenoiser(cond, self.s, means_uncond=uncond, guidance=self.guidance, _counter=self._counter)


def exact_flow(eps: torch.Tensor, sigma: float, mu: float, s: float) -> torch.Tensor:
    """The probability-flow ODE solution from ε at σ = 1: x(σ) = (1-σ)μ + sqrt((1-σ)²s² + σ²)·ε."""
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2) * eps


class RecordingNoise(BatchNoise):
    """Records every draw of step noise: False for the CPU generator, the tree's on_device flag for a Brownian one."""

    def __init__(self, seeds: list[int]) -> None:
        super().__init__(seeds)
        self.draws: list[bool] = []

    def step(self, like: torch.Tensor) -> torch.Tensor:
        self.draws.append(False)
        return super().step(like)

    def brownian(
        self, like: torch.Tensor, sigma_min: float, sigma_max: float, *, on_device: bool = False
    ) -> BrownianNoise:
        tree = super().brownian(like, sigma_min, sigma_max, on_device=on_device)
        draws = self.draws

        class _Recorded(BrownianNoise):
            def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
                draws.append(on_device)
                return tree(sigma, sigma_next)

        return _Recorded(like, self.seeds, sigma_min, sigma_max, on_device=on_device)
