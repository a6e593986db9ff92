"""Every request field: default, range, enum, and a 400 message naming the field and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from sd3serve.api.schemas import ASPECT_RATIOS, Sampler, Scheduler, parse_txt2img
from sd3serve.catalogue import SAMPLER_NAMES, SCHEDULER_NAMES
from sd3serve.errors import InvalidRequest

# The contract's lists, typed out here on purpose: the catalogue must not drift from the published API.
CONTRACT_SAMPLERS = [
    "euler",
    "euler_cfg_pp",
    "euler_ancestral",
    "euler_ancestral_cfg_pp",
    "heun",
    "heunpp2",
    "dpm_2",
    "dpm_2_ancestral",
    "lms",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m",
    "dpmpp_2m_cfg_pp",
    "dpmpp_2m_sde",
    "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ddpm",
    "lcm",
    "ipndm",
    "ipndm_v",
    "deis",
    "ddim",
    "uni_pc",
    "uni_pc_bh2",
]
CONTRACT_SCHEDULERS = [
    "simple",
    "sgm_uniform",
    "karras",
    "exponential",
    "ddim_uniform",
    "beta",
    "normal",
    "linear_quadratic",
    "kl_optimal",
]


def test_defaults_match_the_contract() -> None:
    req = parse_txt2img({"prompt": "a cat"})
    job = req.to_job()
    assert (req.negative_prompt, req.steps, req.guidance_scale, req.seed) == ("low quality, blurry", 4, 1, 98552302)
    assert (req.sampler.value, req.scheduler.value, req.aspect_ratio.value) == ("dpmpp_2m", "sgm_uniform", "custom")
    assert (job.width, job.height, job.batch_size) == (1024, 1024, 1)
    assert (req.image_format.value, req.image_quality, req.base64) == ("jpeg", 95, False)


def test_every_contract_sampler_and_scheduler_is_accepted() -> None:
    assert sorted(SAMPLER_NAMES) == sorted(CONTRACT_SAMPLERS)
    assert sorted(SCHEDULER_NAMES) == sorted(CONTRACT_SCHEDULERS)
    assert [s.value for s in Sampler] == list(SAMPLER_NAMES)
    assert [s.value for s in Scheduler] == list(SCHEDULER_NAMES)
    for s in CONTRACT_SAMPLERS:
        assert parse_txt2img({"prompt": "x", "sampler": s}).sampler.value == s
    for s in CONTRACT_SCHEDULERS:
        assert parse_txt2img({"prompt": "x", "scheduler": s}).scheduler.value == s


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("prompt", "   ", "1 to 10000 characters"),
        ("prompt", "x" * 10001, "1 to 10000 characters"),
        ("prompt", 5, "1 to 10000 characters"),
        ("negative_prompt", "x" * 10001, "at most 10000"),
        ("steps", 0, "1 to 70"),
        ("steps", 71, "1 to 70"),
        ("steps", 2.5, "1 to 70"),
        ("guidance_scale", 0.5, "1 to 15"),
        ("guidance_scale", 15.5, "1 to 15"),
        ("seed", -2, "-1 for a random seed"),
        ("seed", 2**32, "-1 for a random seed"),
        ("sampler", "k_euler", "dpmpp_2m"),
        ("scheduler", "cosine", "sgm_uniform"),
        ("width", 63, "64 to 2048"),
        ("height", 2049, "64 to 2048"),
        ("width", "wide", "64 to 2048"),
        ("aspect_ratio", "4:3", "16:9"),
        ("batch_size", 11, "1 to 10"),
        ("batch_size", 0, "1 to 10"),
        ("image_format", "gif", "jpeg, png, webp"),
        ("image_quality", 9, "10 to 100"),
        ("image_quality", 101, "10 to 100"),
        ("base64", "maybe", "true or false"),
    ],
)
def test_bad_values_name_field_and_allowed(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_txt2img({"prompt": "ok", field: value})
    message = str(e.value)
    assert message.startswith(f"{field}:"), message
    assert allowed in message, message


def test_missing_prompt_and_non_object_body() -> None:
    with pytest.raises(InvalidRequest, match="prompt: required"):
        parse_txt2img({"steps": 4})
    for body in ([], "prompt", 3, None):
        with pytest.raises(InvalidRequest, match="JSON object"):
            parse_txt2img(body)


def test_nan_and_infinite_guidance_are_rejected() -> None:
    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequest, match="guidance_scale"):
            parse_txt2img({"prompt": "x", "guidance_scale": value})


def test_unknown_fields_are_ignored_and_prompt_is_stripped() -> None:
    req = parse_txt2img({"prompt": "  a cat  ", "model": "sd3", "controlnet": [1, 2]})
    assert req.prompt == "a cat"


def test_sizes_round_down_to_multiples_of_16() -> None:
    job = parse_txt2img({"prompt": "x", "width": 1000, "height": 79}).to_job()
    assert (job.width, job.height) == (992, 64)


@pytest.mark.parametrize(("ratio", "size"), [(k, v) for k, v in ASPECT_RATIOS.items() if v])
def test_aspect_ratio_presets_override_width_and_height(ratio: str, size: tuple[int, int]) -> None:
    job = parse_txt2img({"prompt": "x", "aspect_ratio": ratio, "width": 64, "height": 64}).to_job()
    assert (job.width, job.height) == size


def test_seed_minus_one_draws_a_seed_in_range() -> None:
    seeds = {parse_txt2img({"prompt": "x", "seed": -1}).to_job().seed for _ in range(5)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1


def test_batch_without_base64_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="base64: true"):
        parse_txt2img({"prompt": "x", "batch_size": 2})
    assert parse_txt2img({"prompt": "x", "batch_size": 2, "base64": True}).to_job().seeds[1] == 98552303
