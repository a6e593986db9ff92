"""Samplers (ComfyUI's KSampler names) for rectified-flow models, k-diffusion style.

Every sampler has the signature ``sample(model, x, sigmas, *, noise, callback) -> x0``: ``model`` is a
:class:`Denoiser` returning the (guided) denoised prediction x0, ``x`` is the starting latent already scaled to
``sigmas[0]``, ``noise`` is the request's :class:`~sd3serve.engine.noise.BatchNoise`.

Flow conventions: ``x_σ = α·x0 + σ·ε`` with ``α = 1 - σ``; the probability-flow ODE in σ is
``dx/dσ = (x - D(x, σ)) / σ`` (k-diffusion's ``to_d``: for flow it is the velocity ε - x0), so deterministic
solvers in σ carry over. Everything that depends on the noise *schedule* uses the flow's own α and σ:

* half-log-SNR ``λ = log(α/σ) = logit(1-σ)`` for the exponential integrators (DPM-Solver++, UniPC, SDE);
* re-noising keeps the flow marginal: stepping to ``σ_next`` ends at ``(1-σ_next)·x0 + σ_next·ε`` in
  distribution (ComfyUI's ``*_RF`` ancestral steps, the flow DDPM posterior, ``noise_scaling``), never the
  variance-exploding ``x + σ_up·ε``;
* σ = 1 exactly (α = 0, λ = -∞): first-order steps are written in σ ratios, which are exact there; solvers that
  need finite λ history offset the first σ to ``SNR_SIGMA_MAX`` as ComfyUI's ``offset_first_sigma_for_snr``.

Scalar coefficients are computed in Python float64 from ``sigmas.tolist()`` (one host sync per call), tensors
only see ``x ← a·x + b·D`` updates, so every batch item is computed independently of the others.

The samplers that start every step with the model's x0 at σ share one step loop (``_run``): each gives only its
update from σ to σ', and the step to σ = 0 ends at that x0.

What each sampler is (stochastic, CFG++, order, ...) is in :mod:`sd3serve.catalogue`, torch-free, with the
solver family that runs it and its options (as k-diffusion's ``solver_type=``): ``SAMPLERS`` is built from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from sd3serve.catalogue import SAMPLER_INFO
from sd3serve.engine.noise import BatchNoise, BrownianNoise


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        """The guided denoised prediction x0 at noise level ``sigma`` (a 0-dim tensor)."""
        ...

    def with_uncond(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(guided x0, unconditional x0), for CFG++: the negative prompt's x0 even at guidance 1 (ComfyUI's
        ``disable_cfg1_optimization``); the same tensor twice only when the request has no negative side."""
        ...

    def rows(self, indices: list[int]) -> Denoiser:
        """The same denoiser for a subset of the batch's rows: it takes and returns ``len(indices)`` rows."""
        ...


StepCallback = Callable[[int, int], None]  # (step index, number of steps)
OnStep = StepCallback | None


class Sampler(Protocol):
    def __call__(
        self,
        model: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        noise: BatchNoise,
        callback: StepCallback | None = None,
    ) -> Tensor: ...


# First σ for a finite log-SNR: ComfyUI's percent_to_sigma(1e-4) at SD3's shift 3, rounded to float32 as it lands
# in ComfyUI's schedule tensor (0.9999666...).
SNR_SIGMA_MAX = float(torch.tensor(3 * (1 - 1e-4) / (1 + 2 * (1 - 1e-4)), dtype=torch.float32))


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The ODE derivative dx/dσ from the denoised prediction (for flow: the velocity)."""
    return (x - denoised) / sigma


# ---------------------------------------------------------------------------------------------------- helpers


def _floats(sigmas: Tensor) -> list[float]:
    return [float(s) for s in sigmas.detach().to("cpu", torch.float64).tolist()]


class _Sig:
    """0-dim σ tensors for the model, on the schedule's device and dtype; schedule points are views."""

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = sigmas

    def __getitem__(self, i: int) -> Tensor:
        return self.sigmas[i]

    def at(self, value: float) -> Tensor:
        return torch.tensor(value, dtype=self.sigmas.dtype, device=self.sigmas.device)


def _lam(sigma: float) -> float:
    """Half-log-SNR of the flow, log((1-σ)/σ) = logit(1-σ); ±inf at σ = 0 and 1."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)


def _sigma_of_lam(lam: float) -> float:
    return 1.0 / (1.0 + math.exp(lam))  # sigmoid(-λ)


def _f32(value: Tensor) -> float:
    return float(value.to(torch.float32))


def _mid_sigma_f32(s: float, s_to: float, r: float) -> float:
    """σ at λ_s + r·(λ_to - λ_s), evaluated in float32 as ComfyUI does: the model and the Brownian tree then see
    the same float32 σ (a float64 evaluation is an ulp away, which non-smooth models can amplify)."""
    a, b = (torch.tensor(v, dtype=torch.float32) for v in (s, s_to))
    lam_a, lam_b = a.logit().neg(), b.logit().neg()
    return _f32((lam_a + r * (lam_b - lam_a)).neg().sigmoid())


def _offset_first(sig: list[float]) -> list[float]:
    """ComfyUI's offset_first_sigma_for_snr: σ = 1 has no finite log-SNR, start just below it."""
    return [SNR_SIGMA_MAX, *sig[1:]] if len(sig) > 1 and sig[0] >= 1.0 else sig


def _rf_ancestral(s: float, s_next: float, eta: float) -> tuple[float, float, float]:
    """Rectified-flow ancestral step (ComfyUI's ``*_RF``): (σ_down, α_next/α_down, renoise std).

    Step deterministically to σ_down, scale by α_next/α_down and add renoise·ε: the marginal is again
    ``(1-σ_next)·x0 + σ_next·ε``.
    """
    s_down = s_next * (1 + (s_next / s - 1) * eta)
    a_next, a_down = 1 - s_next, 1 - s_down
    renoise = math.sqrt(max(s_next**2 - s_down**2 * a_next**2 / a_down**2, 0.0))
    return s_down, a_next / a_down, renoise


def _rf_renoise(s_next: float, s_down: float) -> tuple[float, float]:
    """(α_next/α_down, renoise std) taking a sample at σ_down to the flow marginal at σ_next ≥ σ_down."""
    scale = (1 - s_next) / (1 - s_down)
    return scale, math.sqrt(max(s_next**2 - (s_down * scale) ** 2, 0.0))


def _ve_ancestral(r: float, r_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step on noise-to-signal ratios r = σ/α (the flow's VE-equivalent σ)."""
    if not eta:
        return r_next, 0.0
    up = min(r_next, eta * math.sqrt(max(r_next**2 * (r**2 - r_next**2) / r**2, 0.0)))
    return math.sqrt(r_next**2 - up**2), up


def _comb(*terms: tuple[float, Tensor]) -> Tensor:
    """Σ c·t in one new tensor (one kernel per term: no temporaries per coefficient)."""
    (c0, t0), *rest = terms
    out = t0.mul(c0)
    for c, t in rest:
        out.add_(t, alpha=c)
    return out


def _deriv(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
    return _comb((1 / sigma, x), (-1 / sigma, denoised))  # to_d


def _progress(callback: OnStep, i: int, n: int) -> None:
    if callback is not None:
        callback(i, n)


def _steps(sig: list[float], callback: OnStep) -> Iterator[tuple[int, float, float]]:
    """(i, σ_i, σ_i+1) for every step of the schedule; ``callback`` hears of step i once its body has run."""
    n = len(sig) - 1
    for i in range(n):
        yield i, sig[i], sig[i + 1]
        _progress(callback, i, n)


class _Step(NamedTuple):
    """Step ``i`` of the schedule, from σ = ``s`` to σ' = ``s1`` > 0, with the model's x0 at σ: ``denoised`` (the
    guided one) and ``uncond`` (for CFG++ the unconditional x0, otherwise the same tensor)."""

    i: int
    s: float
    s1: float
    denoised: Tensor
    uncond: Tensor


Update = Callable[[Tensor, _Step], Tensor]  # (x at σ, the step) -> x at σ'


def _run(model: Denoiser, x: Tensor, sigmas: Tensor, callback: OnStep, update: Update, *,
         sig: list[float] | None = None, cfg_pp: bool = False, offset_first: bool = False) -> Tensor:  # fmt: skip
    """The step loop the samplers share: the model's x0 at every σ of the schedule (``sig``: its floats where the
    caller has them), that x0 as the result of the step to σ' = 0, ``update`` for every other step. ``cfg_pp``: the
    guided and the unconditional x0 (``Denoiser.with_uncond``); ``offset_first``: the first σ offset to
    ``SNR_SIGMA_MAX`` (the model sees it at the first step too)."""
    sig = _floats(sigmas) if sig is None else sig
    if offset_first:
        sig = _offset_first(sig)
    st = _Sig(sigmas)
    for i, s, s1 in _steps(sig, callback):
        sigma = st.at(s) if offset_first and i == 0 else st[i]
        if cfg_pp:
            denoised, uncond = model.with_uncond(x, sigma)
        else:
            denoised = uncond = model(x, sigma)
        x = denoised if s1 == 0 else update(x, _Step(i, s, s1, denoised, uncond))
    return x


def _add_noise(x: Tensor, noise: BatchNoise, scale: float, std: float) -> Tensor:
    """scale·x + std·ε, the ancestral re-noising of the flow (``std`` already times s_noise)."""
    return _comb((scale, x), (std, noise.step(x)))


# ------------------------------------------------------------------------------------------ Euler family


def sample_euler(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                 eta: float = 0.0, s_noise: float = 1.0, cfg_pp: bool = False) -> Tensor:  # fmt: skip
    """Euler's method (Karras et al. 2022, Algorithm 2 without churn) at η = 0; at η > 0 ancestral Euler with
    rectified-flow re-noising (ComfyUI's sample_euler_ancestral_RF): a deterministic step to σ_down, then noise back
    to the flow marginal at σ'. ``cfg_pp``: with CFG++ (Chung et al. 2024)."""
    step = _euler_cfg_pp(noise, eta, s_noise) if cfg_pp else _euler(noise, eta, s_noise)
    return _run(model, x, sigmas, callback, step, cfg_pp=cfg_pp)


def _euler(noise: BatchNoise, eta: float, s_noise: float) -> Update:
    def step(x: Tensor, at: _Step) -> Tensor:
        s_down, scale, renoise = _rf_ancestral(at.s, at.s1, eta)  # η = 0: σ_down = σ', nothing re-noised
        x = torch.lerp(at.denoised, x, s_down / at.s)  # x + (σ_down-σ)·(x-D)/σ
        if eta > 0:
            x = _add_noise(x, noise, scale, renoise * s_noise)
        return x

    return step


def _euler_cfg_pp(noise: BatchNoise, eta: float, s_noise: float) -> Update:
    """CFG++ Euler as ComfyUI: x' = α'·D_g + σ_down·ε̂_u + α'·r_up·z with ε̂_u = (x - α·D_u)/σ and the ancestral split
    taken on the noise-to-signal ratios r = σ/α (the paper's VE variable x/α); η = 0 is DDIM-CFG++ (euler_cfg_pp)."""

    def step(x: Tensor, at: _Step) -> Tensor:
        s, s1, guided, uncond = at.s, at.s1, at.denoised, at.uncond
        a_s, a_t = 1 - s, 1 - s1
        if a_s <= 0:  # σ = 1: r = ∞, all of σ' is fresh noise (ComfyUI's get_ancestral_step gives up = r')
            r_down, r_up = (0.0, s1 / a_t) if eta else (s1 / a_t, 0.0)
        else:
            r_down, r_up = _ve_ancestral(s / a_s, s1 / a_t, eta)
        c = a_t * r_down / s  # σ_down·ε̂_u
        x = _comb((c, x), (-c * a_s, uncond), (a_t, guided))
        if eta > 0 and s_noise > 0:
            x.add_(noise.step(x), alpha=a_t * r_up * s_noise)
        return x

    return step


def sample_heun(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None) -> Tensor:
    """Heun's method (Karras et al. 2022, Algorithm 1); Euler on the last step to σ = 0."""
    st = _Sig(sigmas)

    def step(x: Tensor, at: _Step) -> Tensor:
        s, s1 = at.s, at.s1
        d = _deriv(x, at.denoised, s)
        x_2 = torch.add(x, d, alpha=s1 - s)
        d_2 = _deriv(x_2, model(x_2, st[at.i + 1]), s1)
        return _comb((1.0, x), (0.5 * (s1 - s), d), (0.5 * (s1 - s), d_2))

    return _run(model, x, sigmas, callback, step)


def sample_heunpp2(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None) -> Tensor:
    """Heun++ (Carzit's sd-webui-samplers-scheduler, as ComfyUI): 3-stage σ-weighted Heun."""
    sig, st = _floats(sigmas), _Sig(sigmas)
    s_end = sig[-1]
    for i, s, s1 in _steps(sig, callback):
        d = _deriv(x, model(x, st[i]), s)
        dt = s1 - s
        if s1 == s_end:
            x = torch.add(x, d, alpha=dt)
            continue
        x_2 = torch.add(x, d, alpha=dt)
        d_2 = _deriv(x_2, model(x_2, st[i + 1]), s1)
        if sig[i + 2] == s_end:
            w2 = s1 / (2 * sig[0])
            x = _comb((1.0, x), (dt * (1 - w2), d), (dt * w2, d_2))
        else:
            s2 = sig[i + 2]
            x_3 = torch.add(x_2, d_2, alpha=s2 - s1)
            d_3 = _deriv(x_3, model(x_3, st[i + 2]), s2)
            w2, w3 = s1 / (3 * sig[0]), s2 / (3 * sig[0])
            x = _comb((1.0, x), (dt * (1 - w2 - w3), d), (dt * w2, d_2), (dt * w3, d_3))
    return x


def sample_dpm_2(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                 eta: float = 0.0, s_noise: float = 1.0) -> Tensor:  # fmt: skip
    """DPM-Solver-2-style midpoint in log σ (Karras et al. 2022 / k-diffusion), Euler on the last step; at η > 0
    ancestral, with rectified-flow re-noising (ComfyUI's sample_dpm_2_ancestral_RF)."""
    st = _Sig(sigmas)

    def step(x: Tensor, at: _Step) -> Tensor:
        s = at.s
        s_down, scale, renoise = _rf_ancestral(s, at.s1, eta)  # η = 0: σ_down = σ'
        s_mid = math.sqrt(s * s_down)
        x_2 = torch.lerp(at.denoised, x, s_mid / s)
        x = _comb((1.0, x), ((s_down - s) / s_mid, x_2), ((s - s_down) / s_mid, model(x_2, st.at(s_mid))))
        if eta > 0:
            x = _add_noise(x, noise, scale, renoise * s_noise)
        return x

    return _run(model, x, sigmas, callback, step)


# -------------------------------------------------------------------------------- linear multistep (σ-time)


def _lagrange_integral(nodes: list[float], j: int, a: float, b: float, weight_pow: int = 0) -> float:
    """∫_a^b ℓ_j(τ)·τ^weight_pow dτ for the Lagrange basis ℓ_j on ``nodes`` (exact; weight_pow ≥ -2)."""
    poly = [1.0]  # ascending coefficients of Π_{k≠j} (τ - t_k) / (t_j - t_k)
    for k, t in enumerate(nodes):
        if k != j:
            inv = 1.0 / (nodes[j] - t)
            poly = [
                ((poly[m - 1] if m > 0 else 0.0) - t * (poly[m] if m < len(poly) else 0.0)) * inv
                for m in range(len(poly) + 1)
            ]
    total = 0.0
    for m, c in enumerate(poly):
        p = m + weight_pow  # ∫ c·τ^p
        total += c * (math.log(b / a) if p == -1 else (b ** (p + 1) - a ** (p + 1)) / (p + 1))
    return total


def _solve(mat: list[list[float]], rhs: list[float]) -> list[float]:
    """Gaussian elimination with partial pivoting for the tiny UniPC systems."""
    n = len(rhs)
    a = [[*row, r] for row, r in zip(mat, rhs, strict=True)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        for r in range(c + 1, n):
            f = a[r][c] / a[c][c]
            a[r] = [v - f * w for v, w in zip(a[r], a[c], strict=True)]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (a[r][n] - sum(a[r][k] * out[k] for k in range(r + 1, n))) / a[r][r]
    return out


def sample_lms(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
               order: int = 4) -> Tensor:  # fmt: skip
    """Linear multistep (Adams–Bashforth in σ, order 4; k-diffusion's sample_lms, exact coefficients)."""
    sig = _floats(sigmas)
    ds: list[Tensor] = []

    def step(x: Tensor, at: _Step) -> Tensor:
        nonlocal ds
        i, s, s1 = at.i, at.s, at.s1
        ds = [*ds, _deriv(x, at.denoised, s)][-order:]
        nodes = [sig[i - k] for k in range(min(i + 1, order))]
        return _comb((1.0, x), *((_lagrange_integral(nodes, j, s, s1), ds[-1 - j]) for j in range(len(nodes))))

    return _run(model, x, sigmas, callback, step, sig=sig)


def sample_ipndm(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                 max_order: int = 4, variable_step: bool = False) -> Tensor:  # fmt: skip
    """Improved PNDM (Zhang & Chen 2023, DEIS paper): Adams–Bashforth in σ of order ≤ 4 with the fixed coefficients
    of equal steps, or with ``variable_step`` those of the actual step sizes (ComfyUI's ipndm_v)."""
    sig = _floats(sigmas)
    buf: list[Tensor] = []

    def step(x: Tensor, at: _Step) -> Tensor:
        nonlocal buf
        i, s, s1 = at.i, at.s, at.s1
        d = _deriv(x, at.denoised, s)
        order = min(max_order, i + 1)
        cs = _ipndm_v_coeffs(sig, i, order) if variable_step else _IPNDM_COEFFS[order]
        hist = [d, *reversed(buf)]
        buf = [*buf, d][-(max_order - 1) :]
        return _comb((1.0, x), *(((s1 - s) * c, dd) for c, dd in zip(cs, hist, strict=False)))

    return _run(model, x, sigmas, callback, step, sig=sig)


# iPNDM's Adams–Bashforth coefficients for equal steps, by order (newest derivative first)
_IPNDM_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _ipndm_v_coeffs(t: list[float], i: int, order: int) -> tuple[float, ...]:
    """Variable-step iPNDM coefficients (zju-pi diff-solvers, as ComfyUI's sample_ipndm_v)."""
    h = t[i + 1] - t[i]
    if order == 1:
        return (1.0,)
    h1 = t[i] - t[i - 1]
    if order == 2:
        return ((2 + h / h1) / 2, -(h / h1) / 2)
    h2 = t[i - 1] - t[i - 2]
    temp1 = (1 - h / (3 * (h + h1)) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
    if order == 3:
        return ((2 + h / h1) / 2 + temp1, -(h / h1) / 2 - (1 + h1 / h2) * temp1, temp1 * h1 / h2)
    h3 = t[i - 2] - t[i - 3]
    temp2 = (
        ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2)))
        * (h * (h + h1) * (h + h1 + h2))
        / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return (
        (2 + h / h1) / 2 + temp1 + temp2,
        -(h / h1) / 2 - (1 + h1 / h2) * temp1 - (1 + h1 / h2 + q) * temp2,
        temp1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * temp2,
        -temp2 * q * h1 / h2,
    )


def sample_deis(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                max_order: int = 3) -> Tensor:  # fmt: skip
    """DEIS tAB (Zhang & Chen 2022): exponential integrator, x0 extrapolated by Lagrange polynomials in σ.

    For flow, d(x/σ)/dσ = -D/σ², so x' = (σ'/σ)·x - σ'·Σ_j D_j ∫_σ^σ' ℓ_j(τ)/τ² dτ (integrals exact).
    """
    sig = _floats(sigmas)
    buf: list[Tensor] = []

    def step(x: Tensor, at: _Step) -> Tensor:
        nonlocal buf
        i, s, s1 = at.i, at.s, at.s1
        order = min(max_order, i + 1)
        nodes = [sig[i - k] for k in range(order)]
        hist = [at.denoised, *reversed(buf)]
        ws = [-s1 * _lagrange_integral(nodes, j, s, s1, weight_pow=-2) for j in range(order)]
        buf = [*buf, at.denoised][-(max_order - 1) :] if max_order > 1 else []
        return _comb((s1 / s, x), *zip(ws, hist, strict=False))

    return _run(model, x, sigmas, callback, step, sig=sig)


# --------------------------------------------------------------------------------- DPM-Solver (fast / adaptive)


class _DPMSolver:
    """DPM-Solver-1/2/3 (Lu et al. 2022) in t = -log σ on the flow ODE (k-diffusion's form), RF noise for eta."""

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], st: _Sig) -> None:
        self.model, self.st, self.nfe = model, st, 0
        self.on_eval: Callable[[], None] | None = None

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: float) -> Tensor:
        if key not in cache:
            s = math.exp(-t)
            cache[key] = _deriv(x, self.model(x, self.st.at(s)), s)
            self.nfe += 1
            if self.on_eval is not None:
                self.on_eval()
        return cache[key]

    def step(
        self, order: int, x: Tensor, t: float, t1: float, cache: dict[str, Tensor], r1: float | None = None
    ) -> Tensor:
        h, sn = t1 - t, math.exp(-t1)
        em1 = math.expm1(h)
        eps = self.eps(cache, "eps", x, t)
        if order == 1:
            return torch.add(x, eps, alpha=-sn * em1)
        if order == 2:
            r1 = 0.5 if r1 is None else r1
            s1 = t + r1 * h
            u1 = torch.add(x, eps, alpha=-math.exp(-s1) * math.expm1(r1 * h))
            e1 = self.eps(cache, f"eps_r{r1}", u1, s1)
            c = sn / (2 * r1) * em1
            return _comb((1.0, x), (c - sn * em1, eps), (-c, e1))
        r1, r2 = 1 / 3, 2 / 3
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = torch.add(x, eps, alpha=-math.exp(-s1) * math.expm1(r1 * h))
        e1 = self.eps(cache, f"eps_r{r1}", u1, s1)
        c1 = math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1)
        u2 = _comb((1.0, x), (c1 - math.exp(-s2) * math.expm1(r2 * h), eps), (-c1, e1))
        e2 = self.eps(cache, "eps_r2", u2, s2)
        c2 = sn / r2 * (em1 / h - 1)
        return _comb((1.0, x), (c2 - sn * em1, eps), (-c2, e2))


def _fast_range(sig: list[float]) -> tuple[float, float, bool]:
    """(σ_max, σ_min > 0, whether a final denoise to σ = 0 follows), as ComfyUI's dpm_fast/adaptive wrappers."""
    if sig[-1] == 0:
        return sig[0], sig[-2], True
    return sig[0], sig[-1], False


def sample_dpm_fast(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                    eta: float = 0.0, s_noise: float = 1.0) -> Tensor:  # fmt: skip
    """DPM-Solver-Fast (Lu et al. 2022): orders 3,…,3,2,1 on a uniform log-σ grid, n model calls in all.

    Integrates from σ_max to the last positive σ with n-1 calls, then denoises to σ = 0 with the last one
    (ComfyUI stops at σ_min, which leaves visible noise at flow step counts).
    """
    sig, st, n = _floats(sigmas), _Sig(sigmas), len(sigmas) - 1
    if n < 1:
        return x
    s_max, s_min, denoise = _fast_range(sig)
    nfe = n - 1 if denoise else n
    calls = [0]

    def on_eval() -> None:
        _progress(callback, calls[0], n)
        calls[0] += 1

    solver = _DPMSolver(model, st)
    solver.on_eval = on_eval
    if nfe > 0 and s_min < s_max:
        t_start, t_end = -math.log(s_max), -math.log(s_min)
        m = nfe // 3 + 1
        ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            t, t1 = ts[i], ts[i + 1]
            if eta > 0:
                s_down = max(_rf_ancestral(math.exp(-t), math.exp(-t1), eta)[0], s_min)
                x = solver.step(order, x, t, -math.log(s_down), {})
                scale, renoise = _rf_renoise(math.exp(-t1), s_down)
                x = _comb((scale, x), (renoise * s_noise, noise.step(x)))
            else:
                x = solver.step(order, x, t, t1, {})
    if denoise:
        x = model(x, st.at(s_min))
        on_eval()
    return x


def sample_dpm_adaptive(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, accept_safety: float = 0.81,
                        max_nfe: int = 120, eta: float = 0.0, s_noise: float = 1.0) -> Tensor:  # fmt: skip
    """DPM-Solver-23 with adaptive step size (Lu et al. 2022; I-controller as k-diffusion), ≤ max_nfe calls.

    The error norm and the step size are per image (batch invariance), so each image is integrated in turn
    through ``model.rows([k])``: a batch of B costs the model calls of B single requests (at most ``max_nfe``
    per image). Progress goes to ``callback`` as the fraction of the σ range covered.
    """
    sig, st, n = _floats(sigmas), _Sig(sigmas), len(sigmas) - 1
    if n < 1:
        return x
    s_max, s_min, denoise = _fast_range(sig)
    t_start, t_end = -math.log(s_max), -math.log(s_min)
    b = x.shape[0]
    ctrl_order = 1.5 if eta > 0 else 3.0
    reported = [0]

    def report(frac: float) -> None:
        upto = min(n - 1, int(frac * n))
        while reported[0] < upto:
            _progress(callback, reported[0], n)
            reported[0] += 1

    rows: list[Tensor] = []
    for k in range(b):
        row_model, row_noise = (model, noise) if b == 1 else (model.rows([k]), noise.rows([k]))
        xk, x_prev = x[k : k + 1], x[k : k + 1]
        solver = _DPMSolver(row_model, st)
        t, h = t_start, h_init
        cache: dict[str, Tensor] = {}
        while t < t_end - 1e-5:
            force = solver.nfe + 6 + (1 if denoise else 0) > max_nfe  # keep a forced last step affordable
            t1 = t_end if force else min(t_end, t + h)
            s_down = math.exp(-t1)
            if eta > 0:
                s_down = max(_rf_ancestral(math.exp(-t), s_down, eta)[0], s_min)
            t_down = -math.log(s_down)
            x_low = solver.step(2, xk, t, t_down, cache, r1=1 / 3)
            x_high = solver.step(3, xk, t, t_down, cache)
            delta = x_low.abs()
            torch.maximum(delta, x_prev.abs(), out=delta)
            diff = torch.sub(x_low, x_high).div_(delta.mul_(rtol).clamp_min_(atol))
            err = float(torch.linalg.vector_norm(diff)) / xk.numel() ** 0.5  # one host sync per attempt
            factor = 1 + math.atan((1 / (err + 1e-8)) ** (1 / ctrl_order) - 1)  # I-controller, limited
            if factor >= accept_safety or force:
                x_prev, xk = x_low, x_high
                if eta > 0:
                    scale, renoise = _rf_renoise(math.exp(-t1), s_down)
                    xk = _comb((scale, xk), (renoise * s_noise, row_noise.step(xk)))
                t, cache = t1, {}
                report((k + (s_max - math.exp(-t)) / (s_max - s_min)) / b)
            else:
                cache = {"eps": cache["eps"]}  # same x and σ: only the first evaluation stays valid
            h = h * factor
        if denoise:
            xk = row_model(xk, st.at(s_min))
        rows.append(xk)
        report((k + 1) / b)
    while reported[0] < n:
        _progress(callback, reported[0], n)
        reported[0] += 1
    return torch.cat(rows)


# --------------------------------------------------------------------------- DPM-Solver++ (half-log-SNR λ)


def _midpoint_2s(s: float, s_down: float) -> float:
    """DPM-Solver++(2S)'s midpoint in λ between σ and σ_down; at σ = 1 (λ = -∞) ComfyUI's σ_s = 0.9999."""
    return 0.9999 if s >= 1.0 else _mid_sigma_f32(s, s_down, 0.5)


def sample_dpmpp_2s_ancestral(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                              eta: float = 1.0, s_noise: float = 1.0, cfg_pp: bool = False) -> Tensor:  # fmt: skip
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022), λ = logit(1-σ), RF re-noising (ComfyUI's *_RF); ``cfg_pp``: as
    ComfyUI for flow models, the unconditional 2S step plus α'·(D_g - D_u)."""
    st = _Sig(sigmas)

    def step(x: Tensor, at: _Step) -> Tensor:
        s, s1 = at.s, at.s1
        s_down, scale, renoise = _rf_ancestral(s, s1, eta)
        s_mid = _midpoint_2s(s, s_down)
        u = torch.lerp(at.uncond, x, s_mid / s)
        if cfg_pp:  # ComfyUI's *_RF_cfg_pp: the unconditional 2S step, then α'·(D_g - D_u) of the first call
            x = torch.lerp(model.with_uncond(u, st.at(s_mid))[1], x, s_down / s)
        else:
            x = torch.lerp(model(u, st.at(s_mid)), x, s_down / s)
        if eta > 0:
            x = _comb((scale, x), (renoise * s_noise, noise.step(x)))
        if cfg_pp:
            x.add_(at.denoised, alpha=1 - s1).sub_(at.uncond, alpha=1 - s1)
        return x

    return _run(model, x, sigmas, callback, step, cfg_pp=cfg_pp)


def _brownian(noise: BatchNoise, x: Tensor, sigmas: Tensor, on_device: bool) -> BrownianNoise:
    """ComfyUI's BrownianTreeNoiseSampler for the SDE samplers: over the schedule's [σ_min > 0, σ_max]."""
    positive = sigmas[sigmas > 0]
    return noise.brownian(x, float(positive.min()), float(sigmas.max()), on_device=on_device)


def sample_dpmpp_sde(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                     eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5,
                     on_device: bool = False) -> Tensor:  # fmt: skip
    """DPM-Solver++ SDE (Lu et al. 2022), 2 stages, λ = logit(1-σ), noise in the flow's σ/α; ``on_device``: the
    Brownian tree grows on the compute device."""
    st = _Sig(sigmas)
    fac = 1 / (2 * r)
    tree = _brownian(noise, x, sigmas, on_device) if eta > 0 and s_noise > 0 else None

    def step(x: Tensor, at: _Step) -> Tensor:
        s, s1, denoised = at.s, at.s1, at.denoised
        lam_s, lam_t = _lam(s), _lam(s1)
        h = lam_t - lam_s
        lam_1 = lam_s + r * h
        s_1 = _mid_sigma_f32(s, s1, r)
        a_s, a_1, a_t = 1 - s, 1 - s_1, 1 - s1
        # stage 1: exponential step to λ_1 with ancestral noise in the noise-to-signal ratio e^{-λ}
        rd, ru = _ve_ancestral(math.exp(-lam_s), math.exp(-lam_1), eta)
        h_ = -math.log(rd) - lam_s
        x_2 = _comb(((a_1 / a_s) * math.exp(-h_), x), (-a_1 * math.expm1(-h_), denoised))
        if tree is not None:
            x_2.add_(tree(s, s_1), alpha=a_1 * ru * s_noise)
        denoised_2 = model(x_2, st.at(s_1))
        # stage 2
        rd, ru = _ve_ancestral(math.exp(-lam_s), math.exp(-lam_t), eta)
        h_ = -math.log(rd) - lam_s
        c = -a_t * math.expm1(-h_)
        x = _comb(((a_t / a_s) * math.exp(-h_), x), (c * (1 - fac), denoised), (c * fac, denoised_2))
        if tree is not None:
            x.add_(tree(s, s1), alpha=a_t * ru * s_noise)
        return x

    return _run(model, x, sigmas, callback, step, offset_first=True)


def sample_dpmpp_2m(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                    cfg_pp: bool = False) -> Tensor:  # fmt: skip
    """DPM-Solver++(2M) (Lu et al. 2022) on the flow ODE in t = -log σ, as k-diffusion and ComfyUI.

    The first-order part (σ'/σ)·x + (1-σ'/σ)·D is the exact flow step (the same as with λ = logit(1-σ)); the
    second-order term uses step ratios in log σ, which keeps the σ = 1 evaluation as history (λ = -∞ there).
    On the Gaussian benchmark this is the more accurate choice at 4-8 steps (bench/samplers.py). ``cfg_pp``: with
    CFG++ (Chung et al. 2024), guided x0, unconditional ε̂ and history.
    """
    old: Tensor | None = None
    h_last = 1.0

    def step(x: Tensor, at: _Step) -> Tensor:
        nonlocal old, h_last
        s, s1 = at.s, at.s1
        h = math.log(s / s1)  # t = -log σ: finite at σ = 1, so the σ = 1 evaluation serves as history
        a = s1 / s
        # x' = (σ'/σ)·x + (1-σ'/σ)·D̃, D̃ = D + (h/2h_last)(D - D_old); the first-order part is the exact
        # flow step α'·D + σ'·ε̂, split for CFG++ into guided x0 and unconditional ε̂ = (x - α·D_u)/σ
        c = (1 - a) * h / (2 * h_last) if old is not None else 0.0
        if cfg_pp:
            x = _comb((a, x), (-a * (1 - s), at.uncond), (1 - s1 + c, at.denoised))
        else:
            x = _comb((a, x), (1 - a + c, at.denoised))
        if old is not None:
            x.add_(old, alpha=-c)
        old, h_last = at.uncond, h
        return x

    return _run(model, x, sigmas, callback, step, cfg_pp=cfg_pp)


def sample_dpmpp_multistep_sde(
    model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
    eta: float = 1.0, s_noise: float = 1.0, max_order: int = 2, on_device: bool = False,
) -> Tensor:  # fmt: skip
    """DPM-Solver++ multistep SDE (Lu et al. 2022; k-diffusion), λ = logit(1-σ), noise σ'·sqrt(1-e^{-2hη}):
    ``max_order`` 2 is DPM-Solver++(2M) SDE (midpoint), 3 is (3M) SDE; ``on_device``: the Brownian tree grows on the
    compute device."""
    tree = _brownian(noise, x, sigmas, on_device) if eta > 0 and s_noise > 0 else None
    d_1: Tensor | None = None
    d_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None

    def step(x: Tensor, at: _Step) -> Tensor:
        nonlocal d_1, d_2, h_1, h_2
        s, s1, denoised = at.s, at.s1, at.denoised
        h = _lam(s1) - _lam(s)
        h_eta = h * (eta + 1)
        a_t = 1 - s1
        phi_1 = -math.expm1(-h_eta)
        terms = [((s1 / s) * math.exp(-h * eta), x), (a_t * phi_1, denoised)]
        if max_order >= 3 and h_2 is not None and d_2 is not None and d_1 is not None and h_1 is not None:
            # 3M: x += α'φ_2·d1 - α'φ_3·d2 with d1, d2 the divided differences, folded into coefficients
            r0, r1 = h_1 / h, h_2 / h
            q = r0 / (r0 + r1)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            big_a, big_b = a_t * phi_2, a_t * phi_3
            k0 = (big_a * (1 + q) - big_b / (r0 + r1)) / r0  # on (D - D_1)
            k1 = (big_b / (r0 + r1) - big_a * q) / r1  # on (D_1 - D_2)
            terms = [terms[0], (a_t * phi_1 + k0, denoised), (k1 - k0, d_1), (-k1, d_2)]
        elif h_1 is not None and d_1 is not None:
            # the 3M solver's second step is heun-type (φ_2); DPM-Solver++(2M) SDE is the midpoint variant
            phi = math.expm1(-h_eta) / h_eta + 1 if max_order >= 3 else 0.5 * phi_1
            c = a_t * phi * h / h_1
            terms = [terms[0], (a_t * phi_1 + c, denoised), (-c, d_1)]
        x = _comb(*terms)
        if tree is not None:
            x.add_(tree(s, s1), alpha=s1 * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        return x

    return _run(model, x, sigmas, callback, step, offset_first=True)


# ------------------------------------------------------------------------------------ DDPM, LCM, DDIM


def sample_ddpm(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020): the exact posterior q(x_σ' | x_σ, x0) of the flow's α, σ."""

    def step(x: Tensor, at: _Step) -> Tensor:
        s, s1 = at.s, at.s1
        a_s, a_t = 1 - s, 1 - s1
        ratio = a_s / a_t  # α_{σ|σ'}
        var = max(s**2 - ratio**2 * s1**2, 0.0)  # σ²_{σ|σ'}
        eps = noise.step(x)
        return _comb((ratio * s1**2 / s**2, x), (a_t * var / s**2, at.denoised), (math.sqrt(var) * s1 / s, eps))

    return _run(model, x, sigmas, callback, step)


def sample_lcm(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None) -> Tensor:
    """Latent Consistency Model sampling (Luo et al. 2023): denoise, re-noise as (1-σ')·x0 + σ'·ε."""

    def step(x: Tensor, at: _Step) -> Tensor:
        return torch.lerp(at.denoised, noise.step(at.denoised), at.s1)

    return _run(model, x, sigmas, callback, step)


def sample_ddim(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                eta: float = 0.0) -> Tensor:  # fmt: skip
    """DDIM (Song et al. 2021): x' = α'·x0 + sqrt(σ'² - c²)·ε̂ + c·z; for a rectified flow, η = 0 equals Euler."""
    sig, st = _floats(sigmas), _Sig(sigmas)
    for i, s, s1 in _steps(sig, callback):
        denoised = model(x, st[i])
        a_s, a_t = 1 - s, 1 - s1
        c = 0.0
        if eta > 0 and s1 > 0:
            c = eta * s1 * math.sqrt(max(1 - (a_s * s1 / (a_t * s)) ** 2, 0.0))
        k = math.sqrt(max(s1**2 - c**2, 0.0)) / s  # ε̂ = (x - α·x0)/σ
        x = _comb((k, x), (a_t - k * a_s, denoised))
        if c > 0:
            x.add_(noise.step(x), alpha=c)
    return x


# ------------------------------------------------------------------------------------------------- UniPC


def _unipc_coeffs(rks: list[float], hh: float, order: int, bh2: bool) -> tuple[float, list[float], float]:
    """(B(h), b vector, h·φ_1) for UniPC in data prediction (Zhao et al. 2023, diffusers' layout)."""
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    b_h = math.expm1(hh) if bh2 else hh
    bs: list[float] = []
    for i in range(1, order + 1):
        bs.append(h_phi_k * fact / b_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    return b_h, bs, h_phi_1


def sample_uni_pc(model: Denoiser, x: Tensor, sigmas: Tensor, *, noise: BatchNoise, callback: OnStep = None,
                  bh2: bool = False, order: int = 3) -> Tensor:  # fmt: skip
    """UniPC (Zhao et al. 2023), order 3, data prediction in λ = logit(1-σ); B(h) = h (bh1) or, with ``bh2``,
    B(h) = e^h - 1."""
    sig, st, n = _floats(sigmas), _Sig(sigmas), len(sigmas) - 1
    # λ(1) = -∞: the history coefficients use the offset first σ; the σ-ratio part stays exact at σ = 1
    lam = [_lam(s) for s in _offset_first(sig)]
    ms: list[Tensor] = []  # model outputs, newest last
    x_last: Tensor | None = None
    last_order = 1
    for i, _, _ in _steps(sig, callback):
        denoised = model(x, st[i])
        if i > 0 and x_last is not None:  # UniC: correct x_i with the evaluation just made
            k = last_order
            h = lam[i] - lam[i - 1]
            rks = [(lam[i - 1 - j] - lam[i - 1]) / h for j in range(1, k)] + [1.0]
            b_h, bs, _ = _unipc_coeffs(rks, -h, k, bh2)
            m0 = ms[-1]
            rhos = [0.5] if k == 1 else _solve([[r**p for r in rks] for p in range(k)], bs)
            s0, s1 = sig[i - 1], sig[i]
            x = _comb((s1 / s0, x_last), ((1 - s1) - (s1 / s0) * (1 - s0), m0))  # = σ'/σ·x - α'·hφ_1·m0
            cb = -(1 - s1) * b_h
            cs = [rhos[j - 1] / rks[j - 1] for j in range(1, k)]
            x.add_(denoised, alpha=cb * rhos[-1]).add_(m0, alpha=-cb * (rhos[-1] + sum(cs)))
            for j in range(1, k):
                x.add_(ms[-1 - j], alpha=cb * cs[j - 1])
        ms = [*ms, denoised][-order:]
        s0, s1 = sig[i], sig[i + 1]
        if s1 == 0:
            x = denoised
        else:  # UniP predictor of order k (warm-up, lower order on the final steps)
            k = min(order, i + 1, n - i if n < 10 else order)  # lower_order_final below 10 steps
            h = lam[i + 1] - lam[i]
            rks = [(lam[i - j] - lam[i]) / h for j in range(1, k)] + [1.0]
            b_h, bs, _ = _unipc_coeffs(rks, -h, k, bh2)
            x_last = x
            x = _comb((s1 / s0, x), ((1 - s1) - (s1 / s0) * (1 - s0), denoised))
            if k >= 2:
                rhos_p = [0.5] if k == 2 else _solve([[r**p for r in rks[:-1]] for p in range(k - 1)], bs[:-1])
                cp = [-(1 - s1) * b_h * rhos_p[j - 1] / rks[j - 1] for j in range(1, k)]
                x.add_(denoised, alpha=-sum(cp))
                for j in range(1, k):
                    x.add_(ms[-1 - j], alpha=cp[j - 1])
            last_order = k
    return x


# The solver families by name; each catalogue entry names its family and the options that make it that sampler.
SOLVERS: dict[str, Callable[..., Tensor]] = {
    f.__name__.removeprefix("sample_"): f
    for f in (
        sample_euler,
        sample_heun,
        sample_heunpp2,
        sample_dpm_2,
        sample_lms,
        sample_dpm_fast,
        sample_dpm_adaptive,
        sample_dpmpp_2s_ancestral,
        sample_dpmpp_sde,
        sample_dpmpp_2m,
        sample_dpmpp_multistep_sde,
        sample_ddpm,
        sample_lcm,
        sample_ipndm,
        sample_deis,
        sample_ddim,
        sample_uni_pc,
    )
}
# Each sampler: its family's function with the options that make it that sampler, run without autograd.
SAMPLERS: dict[str, Sampler] = {
    info.name: partial(torch.no_grad()(SOLVERS[info.solver]), **dict(info.options)) for info in SAMPLER_INFO.values()
}
