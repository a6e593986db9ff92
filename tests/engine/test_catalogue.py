"""The catalogue says what the sampler and schedule tables do: same names in the same order, and every property
(stochastic, CFG++, noise on the device, model calls per step) checked against the function that bears the name."""

from __future__ import annotations

import pytest
import torch

from helpers.denoisers import GaussianDenoiser, RecordingNoise
from sd3serve.catalogue import (
    GPU_NOISE_SAMPLERS,
    SAMPLER_INFO,
    SAMPLER_NAMES,
    SCHEDULER_INFO,
    SCHEDULER_NAMES,
    STOCHASTIC_SAMPLERS,
    check_table,
)
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.samplers import SAMPLERS
from sd3serve.engine.schedules import SCHEDULERS, get_sigmas, sampler_sigmas


def test_tables_list_the_catalogued_names_in_order() -> None:
    assert tuple(SAMPLERS) == SAMPLER_NAMES and len(SAMPLER_NAMES) == 29
    assert tuple(SCHEDULERS) == SCHEDULER_NAMES and len(SCHEDULER_NAMES) == 9
    assert all(info.name == name for name, info in SAMPLER_INFO.items())
    assert all(info.name == name for name, info in SCHEDULER_INFO.items())


def test_every_sampler_is_a_solver_family_with_options_it_takes() -> None:
    import inspect

    from sd3serve.engine.samplers import SOLVERS

    for info in SAMPLER_INFO.values():
        accepted = inspect.signature(SOLVERS[info.solver]).parameters
        assert all(option in accepted for option, _ in info.options), info.name
        assert SAMPLERS[info.name].keywords == dict(info.options)  # type: ignore[attr-defined]
    # a variant runs its base's family: only its options differ
    for info in SAMPLER_INFO.values():
        if info.base is not None:
            assert info.solver == SAMPLER_INFO[info.base].solver, info.name
    assert len(SOLVERS) == 17  # 29 samplers, 12 of them options of another's family


@pytest.mark.parametrize(
    ("table", "message"),
    [(("a",), r"missing \['b'\]"), (("a", "b", "c"), r"not catalogued \['c'\]"), (("b", "a"), "order differs")],
)
def test_drift_between_a_table_and_the_catalogue_is_an_error(table: tuple[str, ...], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        check_table("sampler", table, ("a", "b"))


def test_variants_name_their_base_and_share_its_properties() -> None:
    for name, info in SAMPLER_INFO.items():
        assert info.description.strip() and "\n" not in info.description
        assert not (info.cfg_pp and info.gpu_noise)
        if not (info.cfg_pp or info.gpu_noise):
            assert info.base is None, name
            continue
        assert info.base is not None and name == info.base + ("_cfg_pp" if info.cfg_pp else "_gpu")
        base = SAMPLER_INFO[info.base]
        assert base.base is None
        assert (info.stochastic, info.order, info.calls_per_step) == (base.stochastic, base.order, base.calls_per_step)
    assert set(GPU_NOISE_SAMPLERS) <= set(STOCHASTIC_SAMPLERS)  # only a sampler that draws noise can draw it there
    assert all(SAMPLER_INFO[n].order is None for n in STOCHASTIC_SAMPLERS)  # no ODE path to converge to


class RecordingDenoiser(GaussianDenoiser):
    """Counts the calls that ask for the unconditional prediction too (CFG++) apart from the plain ones."""

    def __init__(self) -> None:
        super().__init__(0.5, 0.3, mu_uncond=-0.2, guidance=1.0)
        self.plain_calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.plain_calls += 1
        return super().__call__(x, sigma)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_properties_match_what_the_sampler_does(name: str) -> None:
    info, steps = SAMPLER_INFO[name], 8
    sigmas = sampler_sigmas(name, "sgm_uniform", FlowSampling(3.0), steps)
    assert len(sigmas) == steps + 1
    model, noise = RecordingDenoiser(), RecordingNoise([1])
    SAMPLERS[name](model, noise(torch.empty(1, 4, 8, 8)), sigmas, noise=noise)
    draws = noise.draws
    assert bool(draws) == info.stochastic
    assert info.gpu_noise == (bool(draws) and all(draws))
    assert (model.calls > model.plain_calls) == info.cfg_pp
    if info.calls_per_step is not None:
        assert (info.calls_per_step - 1) * steps < model.calls <= info.calls_per_step * steps, model.calls


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_penultimate_sigma_dropped_as_ksampler(name: str) -> None:
    ms = FlowSampling(3.0)
    sigmas = sampler_sigmas(name, "simple", ms, 6)
    if SAMPLER_INFO[name].discard_penultimate_sigma:
        longer = get_sigmas("simple", ms, 7)
        assert torch.equal(sigmas, torch.cat([longer[:-2], longer[-1:]]))
    else:
        assert torch.equal(sigmas, get_sigmas("simple", ms, 6))
