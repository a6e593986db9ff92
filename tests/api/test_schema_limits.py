"""Every numeric limit of the request body, at its edge and one past it, against the contract's own numbers.

The limits are copied here from ``shared/spec/api-contract.md`` (never read from the schema module), and the
refusal must quote the limit the validator actually applied ("less than or equal to 70"), so a schema whose
bound differs from the contract fails even where its hand-written "allowed:" text still says the right thing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from sd3serve.api.schemas import parse_txt2img
from sd3serve.errors import InvalidRequest

# field: (lowest, highest) accepted, from the contract's request-body table.
CONTRACT_INT_LIMITS: dict[str, tuple[int, int]] = {
    "steps": (1, 70),
    "seed": (0, 2**32 - 1),  # and -1 for a random seed, below
    "width": (64, 2048),
    "height": (64, 2048),
    "batch_size": (1, 10),
    "image_quality": (10, 100),
}
CONTRACT_GUIDANCE = (1.0, 15.0)
CONTRACT_PROMPT_CHARS = 10000
BASE = {"prompt": "a cat", "base64": True}  # base64: a batch above 1 is a valid v1 request


def accepted(field: str, value: Any) -> Any:
    return getattr(parse_txt2img({**BASE, field: value}), field)


def refusal(field: str, value: Any) -> str:
    with pytest.raises(InvalidRequest) as e:
        parse_txt2img({**BASE, field: value})
    message = str(e.value)
    assert message.startswith(f"{field}:"), message
    return message


@pytest.mark.parametrize("field", sorted(CONTRACT_INT_LIMITS))
def test_integer_limits_are_the_contracts(field: str) -> None:
    lo, hi = CONTRACT_INT_LIMITS[field]
    assert accepted(field, lo) == lo
    assert accepted(field, hi) == hi
    above = refusal(field, hi + 1)
    assert f"less than or equal to {hi}" in above, above
    assert f"to {hi}" in above.split("allowed:")[1], above
    if field != "seed":  # seed: -1 is the random seed, -2 is the first refused value (below)
        below = refusal(field, lo - 1)
        assert f"greater than or equal to {lo}" in below, below
        assert f"from {lo} to {hi}" in below, below


def test_seed_minus_one_is_random_and_minus_two_is_refused() -> None:
    assert 0 <= parse_txt2img({**BASE, "seed": -1}).to_job().seed <= 2**32 - 1
    message = refusal("seed", -2)
    assert "greater than or equal to -1" in message, message
    assert f"from -1 to {2**32 - 1} (-1 for a random seed)" in message, message


def test_the_highest_seed_reaches_the_job_unchanged() -> None:
    job = parse_txt2img({**BASE, "seed": 2**32 - 1, "batch_size": 2}).to_job()
    assert job.seed == 2**32 - 1 and job.seeds == [2**32 - 1, 2**32]


def test_guidance_limits_are_the_contracts() -> None:
    lo, hi = CONTRACT_GUIDANCE
    assert accepted("guidance_scale", lo) == lo
    assert accepted("guidance_scale", hi) == hi
    below = refusal("guidance_scale", math.nextafter(lo, -math.inf))
    above = refusal("guidance_scale", math.nextafter(hi, math.inf))
    assert "greater than or equal to 1" in below and "from 1 to 15" in below, below
    assert "less than or equal to 15" in above and "from 1 to 15" in above, above


def test_prompt_length_limits_are_the_contracts() -> None:
    n = CONTRACT_PROMPT_CHARS
    assert accepted("prompt", "x") == "x"
    assert accepted("prompt", "x" * n) == "x" * n
    assert f"at most {n} characters" in refusal("prompt", "x" * (n + 1))
    assert "1 to 10000 characters" in refusal("prompt", "")
    assert accepted("negative_prompt", "") == ""
    assert accepted("negative_prompt", "x" * n) == "x" * n
    assert f"at most {n} characters" in refusal("negative_prompt", "x" * (n + 1))


@pytest.mark.parametrize(("field", "value"), [("width", 2047), ("height", 79), ("width", 64)])
def test_sizes_inside_the_limits_round_down_to_16(field: str, value: int) -> None:
    job = parse_txt2img({**BASE, field: value}).to_job()
    assert getattr(job, field) == value - value % 16
