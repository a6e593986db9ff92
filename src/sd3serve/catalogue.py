"""What each sampler and scheduler is, without the code that runs it: names and properties, torch-free.

The request schema, the tests, the benchmarks and the docs read the names and properties here, so the HTTP layer
imports no tensor library. ``samplers.SAMPLERS`` is built from this table (each entry names its solver family and
options); ``schedules.SCHEDULERS`` must list the same names in the same order (checked when it is imported).
``tests/engine/test_catalogue.py`` checks every property against what the functions do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal


@dataclass(frozen=True)
class SamplerInfo:
    name: str  # ComfyUI's KSampler name
    description: str  # one line: the algorithm and its paper
    stochastic: bool = False  # draws fresh noise at every step, so the result depends on the seed beyond x_T
    # CFG++: guided x0 with the negative prompt's noise estimate, which is evaluated even at guidance 1 (as ComfyUI);
    # equals `base` only when the request has no negative side
    cfg_pp: bool = False
    gpu_noise: bool = False  # draws its noise on the compute device; else equals `base`
    base: str | None = None  # the sampler a CFG++ or *_gpu variant equals when guidance is off / on the CPU
    order: int | None = None  # order of convergence to the probability-flow ODE; None: stochastic or adaptive
    calls_per_step: int | None = 1  # model calls per step at most (the last step may take fewer); None: adaptive
    # ComfyUI's KSampler: schedule steps + 1 σ and drop the penultimate one (schedules.sampler_sigmas)
    discard_penultimate_sigma: bool = False
    solver: str = ""  # the solver family that runs it (samplers.SOLVERS); empty: the sampler's own name
    options: tuple[tuple[str, bool | int | float], ...] = ()  # keyword options of that family that make this sampler

    def __post_init__(self) -> None:
        if not self.solver:
            object.__setattr__(self, "solver", self.name)


@dataclass(frozen=True)
class SchedulerInfo:
    name: str  # ComfyUI's scheduler name
    description: str


def _variant(
    base: SamplerInfo, suffix: str, description: str, *, option: str, flag: Literal["cfg_pp", "gpu_noise"]
) -> SamplerInfo:
    """``base`` with one more option of its solver family (and the property ``flag`` that says so): it equals
    ``base`` where that option changes nothing."""
    return replace(
        base,
        name=f"{base.name}_{suffix}",
        description=description,
        base=base.name,
        options=(*base.options, (option, True)),
        cfg_pp=base.cfg_pp or flag == "cfg_pp",
        gpu_noise=base.gpu_noise or flag == "gpu_noise",
    )


def _cfg_pp(base: SamplerInfo, description: str) -> SamplerInfo:
    return _variant(base, "cfg_pp", description, option="cfg_pp", flag="cfg_pp")


def _gpu(base: SamplerInfo) -> SamplerInfo:
    description = base.description.removesuffix(".") + ", noise drawn on the compute device."
    return _variant(base, "gpu", description, option="on_device", flag="gpu_noise")


def _member(family: SamplerInfo, name: str, description: str, *, options: dict[str, bool | int | float],
            **properties: Any) -> SamplerInfo:  # fmt: skip
    """Another sampler of ``family``'s solver: its options set, its own properties."""
    return replace(family, name=name, description=description, options=tuple(options.items()), **properties)


_EULER = SamplerInfo("euler", "Euler's method (Karras et al. 2022).", order=1)
_DPM_2 = SamplerInfo("dpm_2", "DPM-Solver-2-style midpoint in log σ (Karras et al. 2022).", order=2, calls_per_step=2,
                     discard_penultimate_sigma=True)  # fmt: skip
_IPNDM = SamplerInfo("ipndm", "Improved PNDM (Zhang & Chen 2023), fixed coefficients, order ≤ 4.", order=4)
_UNI_PC = SamplerInfo("uni_pc", "UniPC (Zhao et al. 2023), B(h) = h, order 3.", order=3, discard_penultimate_sigma=True)
_EULER_ANCESTRAL = _member(_EULER, "euler_ancestral", "Ancestral Euler with rectified-flow re-noising.",
                           options={"eta": 1.0}, stochastic=True, order=None)  # fmt: skip
_DPM_2_ANCESTRAL = _member(_DPM_2, "dpm_2_ancestral", "Ancestral DPM-2 with rectified-flow re-noising.",
                           options={"eta": 1.0}, stochastic=True, order=None)  # fmt: skip
_IPNDM_V = _member(_IPNDM, "ipndm_v", "Improved PNDM with variable step sizes (Zhang & Chen 2023).",
                   options={"variable_step": True})  # fmt: skip
_DPMPP_2S_ANCESTRAL = SamplerInfo(
    "dpmpp_2s_ancestral", "Ancestral DPM-Solver++(2S) (Lu et al. 2022).", stochastic=True, calls_per_step=2
)
_DPMPP_SDE = SamplerInfo("dpmpp_sde", "DPM-Solver++ SDE, 2 stages (Lu et al. 2022).", stochastic=True, calls_per_step=2)
_DPMPP_2M = SamplerInfo("dpmpp_2m", "DPM-Solver++(2M) (Lu et al. 2022), multistep.", order=2)
_DPMPP_2M_SDE = SamplerInfo("dpmpp_2m_sde", "DPM-Solver++(2M) SDE, midpoint (Lu et al. 2022).", stochastic=True,
                            solver="dpmpp_multistep_sde", options=(("max_order", 2),))  # fmt: skip
_DPMPP_3M_SDE = _member(_DPMPP_2M_SDE, "dpmpp_3m_sde", "DPM-Solver++(3M) SDE (Lu et al. 2022).",
                        options={"max_order": 3})  # fmt: skip

SAMPLER_INFO: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        _EULER,
        _cfg_pp(_EULER, "Euler with CFG++ (Chung et al. 2024)."),
        _EULER_ANCESTRAL,
        _cfg_pp(_EULER_ANCESTRAL, "Ancestral Euler with CFG++ (Chung et al. 2024)."),
        SamplerInfo("heun", "Heun's method (Karras et al. 2022); Euler on the last step.", order=2, calls_per_step=2),
        # Its σ-weights are not those of a second-order method: it converges with order 1 (measured in the tests).
        SamplerInfo("heunpp2", "Heun++: 3-stage σ-weighted Heun (as ComfyUI).", order=1, calls_per_step=3),
        _DPM_2,
        _DPM_2_ANCESTRAL,
        SamplerInfo("lms", "Linear multistep, Adams–Bashforth in σ of order 4.", order=4),
        # Orders 3, …, 3, 2, 1 on a uniform log-σ grid: the final first-order step makes the whole second order.
        SamplerInfo("dpm_fast", "DPM-Solver-Fast (Lu et al. 2022), one model call per step.", order=2),
        SamplerInfo(
            "dpm_adaptive",
            "DPM-Solver-23 with adaptive step size (Lu et al. 2022); ignores steps.",
            calls_per_step=None,
        ),
        _DPMPP_2S_ANCESTRAL,
        _cfg_pp(_DPMPP_2S_ANCESTRAL, "Ancestral DPM-Solver++(2S) with CFG++ (Chung et al. 2024)."),
        _DPMPP_SDE,
        _gpu(_DPMPP_SDE),
        _DPMPP_2M,
        _cfg_pp(_DPMPP_2M, "DPM-Solver++(2M) with CFG++ (Chung et al. 2024)."),
        _DPMPP_2M_SDE,
        _gpu(_DPMPP_2M_SDE),
        _DPMPP_3M_SDE,
        _gpu(_DPMPP_3M_SDE),
        SamplerInfo("ddpm", "DDPM ancestral sampling (Ho et al. 2020) on the flow's posterior.", stochastic=True),
        SamplerInfo("lcm", "Latent Consistency Model sampling (Luo et al. 2023).", stochastic=True),
        _IPNDM,
        _IPNDM_V,
        SamplerInfo("deis", "DEIS tAB (Zhang & Chen 2022), exponential integrator of order 3.", order=3),
        SamplerInfo("ddim", "DDIM (Song et al. 2021), η = 0: Euler for a rectified flow.", order=1),
        _UNI_PC,
        _member(_UNI_PC, "uni_pc_bh2", "UniPC (Zhao et al. 2023), B(h) = e^h - 1, order 3.", options={"bh2": True}),
    )
}
SAMPLER_NAMES = tuple(SAMPLER_INFO)
STOCHASTIC_SAMPLERS = tuple(n for n, s in SAMPLER_INFO.items() if s.stochastic)
DETERMINISTIC_SAMPLERS = tuple(n for n, s in SAMPLER_INFO.items() if not s.stochastic)
CFG_PP_SAMPLERS = tuple(n for n, s in SAMPLER_INFO.items() if s.cfg_pp)
GPU_NOISE_SAMPLERS = tuple(n for n, s in SAMPLER_INFO.items() if s.gpu_noise)

SCHEDULER_INFO: dict[str, SchedulerInfo] = {
    s.name: s
    for s in (
        SchedulerInfo("simple", "Evenly spaced entries of the model's σ table, from the top."),
        SchedulerInfo("sgm_uniform", "Uniform in timestep from σ_max to σ_min, last point dropped (SGM style)."),
        SchedulerInfo("karras", "Karras et al. (2022) ρ = 7 schedule between σ_min and σ_max."),
        SchedulerInfo("exponential", "Uniform in log σ between σ_max and σ_min."),
        SchedulerInfo(
            "ddim_uniform", "Every (1000 // steps)-th table entry, reversed; starts below σ_max (0.90 at shift 3)."
        ),
        SchedulerInfo("beta", "Timesteps at Beta(0.6, 0.6) quantiles (Lee et al. 2024)."),
        SchedulerInfo("normal", "Uniform in timestep from σ_max to σ_min inclusive."),
        SchedulerInfo("linear_quadratic", "Mochi's schedule: linear for half the steps, then quadratic."),
        SchedulerInfo("kl_optimal", "KL-optimal schedule (Sabour et al. 2024): uniform in arctan σ."),
    )
}
SCHEDULER_NAMES = tuple(SCHEDULER_INFO)


def check_table(kind: str, table_names: tuple[str, ...], catalogue_names: tuple[str, ...]) -> None:
    """Raise if a function table and the catalogue disagree on the names or their order."""
    if table_names != catalogue_names:
        missing = sorted(set(catalogue_names) - set(table_names))
        extra = sorted(set(table_names) - set(catalogue_names))
        raise RuntimeError(
            f"the {kind} table and catalogue.py disagree: missing {missing}, not catalogued {extra}"
            + ("" if missing or extra else ", or the order differs")
        )
