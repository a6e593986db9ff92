"""Each schedule equals ComfyUI's for a discrete-flow model (shift 3, 1000 timesteps), recomputed here from the
definitions in plain Python (mpmath for the Beta quantiles)."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from sd3serve.catalogue import SCHEDULER_NAMES
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.schedules import SCHEDULERS, get_sigmas

SHIFT, T = 3.0, 1000
MS = FlowSampling(SHIFT, T)


def shifted(t: float) -> float:
    return SHIFT * t / (1 + (SHIFT - 1) * t)


TABLE = [shifted(i / T) for i in range(1, T + 1)]  # ModelSamplingDiscreteFlow.sigmas, ascending
S_MIN, S_MAX = TABLE[0], TABLE[-1]


def ref_simple(n: int) -> list[float]:
    return [TABLE[-(1 + int(i * T / n))] for i in range(n)] + [0.0]


def ref_uniform(n: int, sgm: bool) -> list[float]:
    start, end = S_MAX * T, S_MIN * T
    if sgm:
        ts = [start + (end - start) * i / n for i in range(n)]
    else:
        ts = [start + (end - start) * i / (n - 1) for i in range(n)] if n > 1 else [start]
    return [shifted(t / T) for t in ts] + [0.0]


def ref_karras(n: int, rho: float = 7.0) -> list[float]:
    lo, hi = S_MIN ** (1 / rho), S_MAX ** (1 / rho)
    return [(hi + (i / (n - 1) if n > 1 else 0.0) * (lo - hi)) ** rho for i in range(n)] + [0.0]


def ref_exponential(n: int) -> list[float]:
    a, b = math.log(S_MAX), math.log(S_MIN)
    return [math.exp(a + (b - a) * (i / (n - 1) if n > 1 else 0.0)) for i in range(n)] + [0.0]


def ref_ddim_uniform(n: int) -> list[float]:
    stride = max(T // n, 1)
    return [*reversed([TABLE[i] for i in range(1, T, stride)]), 0.0]


def ref_beta(n: int, a: float = 0.6, b: float = 0.6) -> list[float]:
    out, last = [], -1
    for i in range(n):
        q = 1 - i / n
        x = 1.0 if q >= 1 else float(mpmath.findroot(lambda v, q=q: mpmath.betainc(a, b, 0, v, regularized=True) - q,
                                                     (1e-12, 1 - 1e-12), solver="bisect", tol=1e-30))
        t = round(x * (T - 1))
        if t != last:
            out.append(TABLE[t])
        last = t
    return [*out, 0.0]


def ref_linear_quadratic(n: int, thr: float = 0.025) -> list[float]:
    if n == 1:
        return [1.0, 0.0]
    ls = n // 2
    diff = ls - thr * n
    qs = n - ls
    qc = diff / (ls * qs**2)
    lc = thr / ls - 2 * diff / qs**2
    c = qc * ls**2
    sched = [i * thr / ls for i in range(ls)] + [qc * i * i + lc * i + c for i in range(ls, n)] + [1.0]
    return [(1 - v) * S_MAX for v in sched]


def ref_kl_optimal(n: int) -> list[float]:
    if n == 1:
        return [S_MAX, 0.0]
    return [math.tan(i / (n - 1) * math.atan(S_MIN) + (1 - i / (n - 1)) * math.atan(S_MAX)) for i in range(n)] + [0.0]


REFS = {
    "simple": ref_simple,
    "sgm_uniform": lambda n: ref_uniform(n, sgm=True),
    "normal": lambda n: ref_uniform(n, sgm=False),
    "karras": ref_karras,
    "exponential": ref_exponential,
    "ddim_uniform": ref_ddim_uniform,
    "beta": ref_beta,
    "linear_quadratic": ref_linear_quadratic,
    "kl_optimal": ref_kl_optimal,
}


def test_nine_comfy_schedulers() -> None:
    assert set(SCHEDULER_NAMES) == set(REFS) and len(SCHEDULERS) == 9


@pytest.mark.parametrize("steps", [1, 4, 7, 30])
@pytest.mark.parametrize("name", sorted(REFS))
def test_matches_comfy_definition(name: str, steps: int) -> None:
    ours = get_sigmas(name, MS, steps)
    ref = torch.tensor(REFS[name](steps), dtype=torch.float64)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    torch.testing.assert_close(ours.double(), ref, rtol=1e-6, atol=1e-6)
    assert ours[-1] == 0 and bool((ours[:-1] > ours[1:]).all())


def test_known_four_step_values() -> None:
    torch.testing.assert_close(get_sigmas("simple", MS, 4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(
        get_sigmas("sgm_uniform", MS, 4), torch.tensor([1.0, 0.9004, 0.7511, 0.5030, 0.0]), atol=1e-4, rtol=0
    )


def test_shift_and_range_come_from_the_model() -> None:
    other = FlowSampling(shift=1.0)
    assert get_sigmas("karras", other, 4)[1] != get_sigmas("karras", MS, 4)[1]
    torch.testing.assert_close(get_sigmas("simple", other, 4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_unknown_name_and_bad_steps() -> None:
    with pytest.raises(KeyError):
        get_sigmas("nope", MS, 4)
    with pytest.raises(ValueError):
        get_sigmas("simple", MS, 0)
