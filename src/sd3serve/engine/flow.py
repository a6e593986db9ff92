"""Rectified-flow bookkeeping shared by schedules, samplers and the model wrapper.

SD3 is trained as a rectified flow: ``x_σ = (1-σ)·x0 + σ·ε`` with σ from 1 (noise) to 0 (data); the transformer
takes the timestep ``t = 1000·σ`` and predicts the velocity ``v = ε - x0``, so ``x0 = x_σ - σ·v``. Sampling uses
the time-shifted σ: ``σ' = shift·σ / (1 + (shift-1)·σ)`` (shift 3.0 for SD3/SD3.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def time_shift(shift: float, sigma: torch.Tensor) -> torch.Tensor:
    """SD3's timestep shift: σ' = shift·σ / (1 + (shift-1)·σ)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowSampling:
    """A discrete flow model's σ table, as ComfyUI's ``ModelSamplingDiscreteFlow`` builds it.

    ``sigmas[i]`` is the shifted σ of training timestep ``i+1`` (of ``num_train_timesteps``), ascending.
    """

    shift: float = 3.0
    num_train_timesteps: int = 1000
    multiplier: float = 1000.0  # σ → the transformer's timestep input
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ts = torch.arange(1, self.num_train_timesteps + 1, dtype=torch.float64) / self.num_train_timesteps
        object.__setattr__(self, "sigmas", time_shift(self.shift, ts))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's timestep input for σ (SD3: 1000·σ)."""
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """The shifted σ of an unshifted timestep (ComfyUI's ``ModelSamplingDiscreteFlow.sigma``).

        Not the inverse of :meth:`timestep`: schedules that space timesteps evenly (sgm_uniform, normal) go
        through here, so the shift applies to them.
        """
        return time_shift(self.shift, timestep / self.multiplier)
