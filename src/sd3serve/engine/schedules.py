"""σ schedules (ComfyUI's scheduler names) for a discrete rectified-flow model.

A schedule is ``f(model_sampling, steps) -> sigmas``: ``steps + 1`` descending σ values ending in 0 (float32,
CPU). That array is the whole contract between schedule and sampler. Every schedule reads the model's shifted σ
table (:class:`~sd3serve.engine.flow.FlowSampling`), so another shift or σ range changes the sigmas accordingly;
the definitions follow ComfyUI's ``comfy/samplers.py`` for ``ModelSamplingDiscreteFlow``. The table at the end
must list the names of :mod:`sd3serve.catalogue` in its order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from sd3serve.catalogue import SAMPLER_INFO, SCHEDULER_NAMES, check_table
from sd3serve.engine.flow import FlowSampling, time_shift

Schedule = Callable[[FlowSampling, int], torch.Tensor]


def _out(sigs: list[float]) -> torch.Tensor:
    return torch.tensor(sigs, dtype=torch.float32)


def simple(ms: FlowSampling, steps: int) -> torch.Tensor:
    """ComfyUI's "simple": evenly spaced indices into the model's σ table, from the top."""
    stride = len(ms.sigmas) / steps
    sigs = [float(ms.sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return _out([*sigs, 0.0])


def _timestep_uniform(ms: FlowSampling, steps: int, *, sgm: bool) -> torch.Tensor:
    # In float32 throughout, as ComfyUI evaluates it (its σ table, linspace and shift are float32 tensors): the
    # same rounding gives bit-equal σ, where a float64 evaluation is one ulp off at some points.
    table = ms.sigmas.to(torch.float32)
    start, end = table[-1] * ms.multiplier, table[0] * ms.multiplier
    append_zero = True
    if sgm:
        ts = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    else:
        if math.isclose(float(time_shift(ms.shift, end / ms.multiplier)), 0.0, abs_tol=1e-5):
            steps, append_zero = steps + 1, False
        ts = torch.linspace(start, end, steps, dtype=torch.float32)
    sigs = time_shift(ms.shift, ts / ms.multiplier).tolist()
    return _out([*sigs, 0.0] if append_zero else sigs)


def sgm_uniform(ms: FlowSampling, steps: int) -> torch.Tensor:
    """Uniform in timestep from σ_max to σ_min, dropping the last point (SGM/SDXL-Turbo style)."""
    return _timestep_uniform(ms, steps, sgm=True)


def normal(ms: FlowSampling, steps: int) -> torch.Tensor:
    """Uniform in timestep from σ_max to σ_min inclusive, then 0 (ComfyUI's "normal")."""
    return _timestep_uniform(ms, steps, sgm=False)


def karras(ms: FlowSampling, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) ρ-schedule between the shifted table's σ_min and σ_max."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _out([*((hi + ramp * (lo - hi)) ** rho).tolist(), 0.0])


def exponential(ms: FlowSampling, steps: int) -> torch.Tensor:
    """Uniform in log σ between the shifted table's σ_max and σ_min."""
    sigs = torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), steps, dtype=torch.float64).exp()
    return _out([*sigs.tolist(), 0.0])


def ddim_uniform(ms: FlowSampling, steps: int) -> torch.Tensor:
    """Every ``len(table) // steps``-th table entry from index 1 upwards, reversed (ComfyUI's "ddim_uniform").

    Like ComfyUI it need not start at σ_max (4 steps: 0.901); the engine scales the initial noise by sigmas[0].
    """
    table = ms.sigmas
    sigs: list[float] = []
    if math.isclose(float(table[1]), 0.0, abs_tol=1e-5):
        steps += 1
    else:
        sigs = [0.0]
    stride = max(len(table) // steps, 1)
    sigs += [float(table[i]) for i in range(1, len(table), stride)]
    return _out(sigs[::-1])


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) (Lentz continued fraction, Numerical Recipes §6.4)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of :func:`_betainc` in x by bisection (to double precision)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _betainc(a, b, mid) < q else (lo, mid)
    return 0.5 * (lo + hi)


def beta(ms: FlowSampling, steps: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """Timesteps at Beta(α, β) quantiles (Lee et al. 2024, arXiv:2407.12173), deduplicated, then 0."""
    total = len(ms.sigmas) - 1
    sigs: list[float] = []
    last = -1
    for i in range(steps):
        t = round(_beta_ppf(1.0 - i / steps, alpha, beta) * total)  # round-half-even, as numpy.rint
        if t != last:
            sigs.append(float(ms.sigmas[t]))
        last = t
    return _out([*sigs, 0.0])


def linear_quadratic(ms: FlowSampling, steps: int, threshold_noise: float = 0.025) -> torch.Tensor:
    """Mochi's schedule: linear to ``threshold_noise`` for half the steps, then quadratic; times σ_max."""
    if steps == 1:
        sched = [1.0, 0.0]
    else:
        lin_steps = steps // 2
        lin = [i * threshold_noise / lin_steps for i in range(lin_steps)]
        diff = lin_steps - threshold_noise * steps
        quad_steps = steps - lin_steps
        quad_coef = diff / (lin_steps * quad_steps**2)
        lin_coef = threshold_noise / lin_steps - 2 * diff / quad_steps**2
        const = quad_coef * lin_steps**2
        quad = [quad_coef * i**2 + lin_coef * i + const for i in range(lin_steps, steps)]
        sched = [1.0 - s for s in [*lin, *quad, 1.0]]
    return _out([s * ms.sigma_max for s in sched])


def kl_optimal(ms: FlowSampling, steps: int) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, AYS): uniform in arctan σ from σ_max to σ_min."""
    if steps == 1:
        return _out([ms.sigma_max, 0.0])
    u = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    sigs = (u * math.atan(ms.sigma_min) + (1 - u) * math.atan(ms.sigma_max)).tan()
    return _out([*sigs.tolist(), 0.0])


SCHEDULERS: dict[str, Schedule] = {
    "simple": simple,
    "sgm_uniform": sgm_uniform,
    "karras": karras,
    "exponential": exponential,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
    "normal": normal,
    "linear_quadratic": linear_quadratic,
    "kl_optimal": kl_optimal,
}
check_table("scheduler", tuple(SCHEDULERS), SCHEDULER_NAMES)


def get_sigmas(name: str, ms: FlowSampling, steps: int) -> torch.Tensor:
    """``steps + 1`` descending sigmas of scheduler ``name`` for model sampling ``ms`` (KeyError if unknown)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    return SCHEDULERS[name](ms, steps)


def sampler_sigmas(sampler: str, scheduler: str, ms: FlowSampling, steps: int) -> torch.Tensor:
    """The σ that ``sampler`` runs on, as ComfyUI's KSampler builds them: for the samplers that the catalogue marks
    ``discard_penultimate_sigma`` (dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2), ``steps + 1`` σ of the schedule
    without the penultimate one, so the last step is a longer one to σ = 0; for the others the plain schedule."""
    if SAMPLER_INFO[sampler].discard_penultimate_sigma:
        sigmas = get_sigmas(scheduler, ms, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return get_sigmas(scheduler, ms, steps)
