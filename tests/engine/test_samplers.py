"""Samplers against a model whose exact answer is known: Gaussian data N(μ, s²) under the rectified flow."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from helpers.denoisers import GaussianDenoiser, RecordingNoise, exact_flow
from sd3serve.catalogue import (
    CFG_PP_SAMPLERS,
    DETERMINISTIC_SAMPLERS,
    GPU_NOISE_SAMPLERS,
    SAMPLER_INFO,
    SAMPLER_NAMES,
    STOCHASTIC_SAMPLERS,
)
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.noise import BatchNoise
from sd3serve.engine.samplers import SAMPLERS, sample_dpm_adaptive, sample_euler
from sd3serve.engine.schedules import get_sigmas

MU, S = 0.5, 0.3
MS = FlowSampling(3.0)


def run(name: str, model: GaussianDenoiser, x: torch.Tensor, sigmas: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    return SAMPLERS[name](model, x, sigmas, noise=BatchNoise(seeds))


def test_tables_complete_and_distinct() -> None:
    assert tuple(SAMPLERS) == SAMPLER_NAMES  # the names: tests/engine/test_catalogue.py, tests/api/test_schemas.py
    funcs = [SAMPLERS[n] for n in SAMPLER_NAMES]
    assert len(set(map(id, funcs))) == len(funcs), "some name is an alias of another sampler"


# (a) every sampler turns ε into N(μ, s²) ------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_moments_match_data(name: str) -> None:
    """100 steps of "simple" map 37k draws of ε to N(0.5, 1): mean within 0.02 (≈ 4 standard errors), std
    within 4.5% (first-order stochastic samplers still lose ~4% of the spread at 100 steps; ODE solvers < 2%)."""
    mu, s = 0.5, 1.0
    sigmas = get_sigmas("simple", MS, 100).double()
    noise = BatchNoise([7])
    x = noise(torch.empty(1, 4, 96, 96, dtype=torch.float64))
    out = SAMPLERS[name](GaussianDenoiser(mu, s), x, sigmas, noise=noise)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert abs(out.mean().item() - mu) < 0.02, out.mean().item()
    if name == "lcm":
        # LCM re-noises the *posterior mean* at every step: exact for a consistency model, but with the exact
        # E[x0 | x_σ] of this Gaussian the spread shrinks to ~0.69·s at any step count (see docs/samplers.md).
        assert 0.6 * s < out.std().item() < 0.8 * s
    else:
        assert abs(out.std().item() / s - 1) < 0.045, out.std().item()


def test_turbo_default_path() -> None:
    """dpmpp_2m + sgm_uniform at 4 steps (the server default): 4 model calls on ComfyUI's sigmas, the right
    mean, and a smaller error against the exact ODE endpoint than Euler's (the second-order term works)."""
    sigmas = get_sigmas("sgm_uniform", MS, 4)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.9004, 0.7511, 0.5030, 0.0]), atol=1e-4, rtol=0)
    eps = BatchNoise([3])(torch.empty(1, 4, 64, 64))
    model = GaussianDenoiser(0.5, 1.0)
    out = SAMPLERS["dpmpp_2m"](model, eps.clone(), sigmas, noise=BatchNoise([3]))
    assert model.calls == 4
    assert abs(out.mean().item() - 0.5) < 0.02
    exact = exact_flow(eps, 0.0, 0.5, 1.0)
    euler = SAMPLERS["euler"](GaussianDenoiser(0.5, 1.0), eps.clone(), sigmas, noise=BatchNoise([3]))
    assert (out - exact).pow(2).mean() < 0.7 * (euler - exact).pow(2).mean()


# (b) deterministic samplers converge to the exact ODE solution with their order -----------------------------

# Uniform σ grid 1 → 0.1 (the endpoint stays off σ = 0, where ComfyUI's samplers take a plain denoising step),
# data N(0.5, 0.3²), RMS over ε ∈ [-2.5, 2.5]. Observed order = log2(err(N) / err(2N)) at the N given below,
# where the asymptotic regime is reached: multistep methods warm up with an Euler step from σ = 1, whose O(h²)
# error eventually caps every method at order 2, so the higher-order ones are measured at 16 → 32.
# The catalogue's order gives (N, lowest accepted observed order); dpm_fast is measured at a multiple of 3, where N
# and 2N end in the same stage orders (…, 3, 2, 1).
ORDERS = {
    name: (30 if name == "dpm_fast" else 32 if info.order <= 2 else 16, {1: 0.8, 2: 1.6}.get(info.order, 2.5))
    for name, info in SAMPLER_INFO.items()
    if info.order is not None
}


def ode_error(name: str, n: int) -> float:
    sigmas = torch.linspace(1.0, 0.1, n + 1, dtype=torch.float64)
    eps = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(1, 11)
    out = run(name, GaussianDenoiser(MU, S), eps.clone(), sigmas, [0])
    return (out - exact_flow(eps, 0.1, MU, S)).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_convergence_order(name: str) -> None:
    n, lo = ORDERS[name]
    order = math.log2(ode_error(name, n) / ode_error(name, 2 * n))
    assert order >= lo, f"{name}: observed order {order:.2f} < {lo}"
    if lo < 1:
        assert order < 1.3


def test_exact_solution_solves_the_ode() -> None:
    eps, s, h = torch.tensor([1.3, -0.4], dtype=torch.float64), 0.6, 1e-6
    for sig in (0.2, 0.5, 0.9):
        x = exact_flow(eps, sig, MU, S)
        dx = (exact_flow(eps, sig + h, MU, S) - exact_flow(eps, sig - h, MU, S)) / (2 * h)
        d = (x - GaussianDenoiser(MU, S)(x, torch.tensor(sig))) / sig
        torch.testing.assert_close(dx, d, rtol=1e-6, atol=1e-8)
    del s


def test_dpm_adaptive_accurate_and_bounded() -> None:
    sigmas = torch.linspace(1.0, 0.1, 5, dtype=torch.float64)
    eps = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).view(1, 11)
    model = GaussianDenoiser(MU, S)
    out = run("dpm_adaptive", model, eps.clone(), sigmas, [0])
    assert (out - exact_flow(eps, 0.1, MU, S)).abs().max() < 2e-3
    tight = GaussianDenoiser(MU, S)
    sample_dpm_adaptive(tight, eps.clone(), sigmas, noise=BatchNoise([0]), rtol=1e-9, atol=1e-12, max_nfe=40)
    assert tight.calls <= 40


def test_dpm_adaptive_batch_costs_its_single_requests() -> None:
    """Each image is integrated through model.rows([k]): a batch of B makes exactly the model calls of its B
    single requests (not B× more), each call on one row, and every image equals its single request."""
    sigmas = get_sigmas("sgm_uniform", MS, 6)
    seeds = [20, 21, 22, 23]
    mus = torch.tensor([0.5, -0.3, 0.1, 0.8]).view(4, 1, 1, 1)
    noise = BatchNoise(seeds)
    x = noise(torch.empty(4, 4, 8, 8))
    shapes: list[int] = []

    class Rows(GaussianDenoiser):
        def _x0(self, x: torch.Tensor, sigma: float, params: object) -> torch.Tensor:
            shapes.append(x.shape[0])
            return super()._x0(x, sigma, params)  # type: ignore[arg-type]

        def _view(self, cond: object, uncond: object) -> Rows:
            return Rows(cond, self.s, _counter=self._counter)  # type: ignore[arg-type]

    batch_model = Rows(mus, S)
    batch = SAMPLERS["dpm_adaptive"](batch_model, x, sigmas, noise=noise)
    assert set(shapes) == {1}
    single_calls = 0
    for k, seed in enumerate(seeds):
        single_noise = BatchNoise([seed])
        model = GaussianDenoiser(mus[k : k + 1], S)
        single = SAMPLERS["dpm_adaptive"](model, single_noise(torch.empty(1, 4, 8, 8)), sigmas, noise=single_noise)
        torch.testing.assert_close(batch[k : k + 1], single, rtol=0, atol=1e-6)
        single_calls += model.calls
    assert batch_model.calls == single_calls


# (c) euler reproduces diffusers' FlowMatchEulerDiscreteScheduler --------------------------------------------


@pytest.mark.parametrize("steps", [4, 28])
def test_euler_matches_diffusers(steps: int) -> None:
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(steps)
    model = GaussianDenoiser(MU, S)
    x = BatchNoise([11, 12])(torch.empty(2, 4, 8, 8))
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        sig = sched.sigmas[i]
        v = (ref - model(ref, sig)) / sig  # the velocity a flow model predicts
        ref = sched.step(v, t, ref).prev_sample
    ours = SAMPLERS["euler"](model, x, sched.sigmas, noise=BatchNoise([11, 12]))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


# 3. reproducible and batch-invariant ------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_batch_item_equals_single_request(name: str) -> None:
    sigmas = get_sigmas("sgm_uniform", MS, 5)
    seeds = [100, 101, 102]
    noise = BatchNoise(seeds)
    x = noise(torch.empty(3, 4, 8, 8))
    batch = SAMPLERS[name](GaussianDenoiser(MU, S), x, sigmas, noise=noise)
    for i, seed in enumerate(seeds):
        single_noise = BatchNoise([seed])
        xi = single_noise(torch.empty(1, 4, 8, 8))
        single = SAMPLERS[name](GaussianDenoiser(MU, S), xi, sigmas, noise=single_noise)
        torch.testing.assert_close(batch[i : i + 1], single, rtol=0, atol=1e-6)
    again_noise = BatchNoise(seeds)
    again = SAMPLERS[name](GaussianDenoiser(MU, S), again_noise(torch.empty(3, 4, 8, 8)), sigmas, noise=again_noise)
    assert torch.equal(batch, again)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_only_stochastic_samplers_use_the_noise(name: str) -> None:
    sigmas = get_sigmas("simple", MS, 6)
    x = BatchNoise([1])(torch.empty(1, 4, 8, 8))
    a = SAMPLERS[name](GaussianDenoiser(MU, S), x.clone(), sigmas, noise=BatchNoise([1]))
    b = SAMPLERS[name](GaussianDenoiser(MU, S), x.clone(), sigmas, noise=BatchNoise([2]))
    if name in STOCHASTIC_SAMPLERS:
        assert not torch.allclose(a, b)
    else:
        assert name in DETERMINISTIC_SAMPLERS and torch.equal(a, b)


@pytest.mark.parametrize("name", GPU_NOISE_SAMPLERS)
def test_gpu_variants_draw_on_device(name: str) -> None:
    base = SAMPLER_INFO[name].base
    assert base is not None
    sigmas = get_sigmas("simple", MS, 6)
    x = BatchNoise([5])(torch.empty(1, 4, 8, 8))
    cpu_noise, dev_noise = RecordingNoise([5]), RecordingNoise([5])
    a = SAMPLERS[base](GaussianDenoiser(MU, S), x.clone(), sigmas, noise=cpu_noise)
    b = SAMPLERS[name](GaussianDenoiser(MU, S), x.clone(), sigmas, noise=dev_noise)
    assert cpu_noise.draws and not any(cpu_noise.draws)
    assert dev_noise.draws and all(dev_noise.draws)
    torch.testing.assert_close(a, b)  # on a CPU tensor, "the device" is the CPU: same generator, same draws


# CFG++ -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CFG_PP_SAMPLERS)
def test_cfg_pp_uses_the_negative_prompt_even_at_guidance_1(name: str) -> None:
    """Without a negative side a CFG++ sampler is its base (euler_ancestral_cfg_pp splits its noise in σ/α, so
    only its η = 0 form, euler_cfg_pp, is); with one it differs at guidance 1 already (ComfyUI evaluates it)."""
    base_name = SAMPLER_INFO[name].base
    assert base_name is not None
    sigmas = get_sigmas("sgm_uniform", MS, 6)
    x = BatchNoise([9, 10])(torch.empty(2, 4, 8, 8))
    plain = GaussianDenoiser(MU, S)
    pp = SAMPLERS[name](plain, x.clone(), sigmas, noise=BatchNoise([9, 10]))
    base = SAMPLERS[base_name](plain, x.clone(), sigmas, noise=BatchNoise([9, 10]))
    if name == "euler_ancestral_cfg_pp":
        pp = sample_euler(plain, x.clone(), sigmas, noise=BatchNoise([9, 10]), eta=0.0, cfg_pp=True)
        base = SAMPLERS["euler"](plain, x.clone(), sigmas, noise=BatchNoise([9, 10]))
    torch.testing.assert_close(pp, base, rtol=0, atol=1e-5)
    for w in (1.0, 3.0):
        model = GaussianDenoiser(MU, S, mu_uncond=-0.2, guidance=w)
        pp = SAMPLERS[name](model, x.clone(), sigmas, noise=BatchNoise([9, 10]))
        base = SAMPLERS[base_name](model, x.clone(), sigmas, noise=BatchNoise([9, 10]))
        assert not torch.allclose(pp, base, atol=1e-3)
        assert torch.isfinite(pp).all()


# contract: callback, no_grad, degenerate schedules -----------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_callback_once_per_step_and_no_grad(name: str) -> None:
    sigmas = get_sigmas("sgm_uniform", MS, 4)
    x = BatchNoise([1, 2])(torch.empty(2, 4, 8, 8)).requires_grad_()
    seen: list[tuple[int, int]] = []
    out = SAMPLERS[name](GaussianDenoiser(MU, S), x, sigmas, noise=BatchNoise([1, 2]),
                         callback=lambda i, n: seen.append((i, n)))
    assert seen == [(i, 4) for i in range(4)]
    assert not out.requires_grad


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_one_step_and_partial_schedule(name: str) -> None:
    x = BatchNoise([4])(torch.empty(1, 4, 8, 8))
    one = SAMPLERS[name](GaussianDenoiser(MU, S), x.clone(), torch.tensor([1.0, 0.0]), noise=BatchNoise([4]))
    assert torch.isfinite(one).all()
    part = get_sigmas("ddim_uniform", MS, 4)  # starts at σ = 0.90, as ComfyUI's ddim_uniform
    out = SAMPLERS[name](GaussianDenoiser(MU, S), x * part[0], part, noise=BatchNoise([4]))
    assert torch.isfinite(out).all()
