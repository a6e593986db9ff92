"""OpenAI bodies as docs/api.md ("OpenAI-compatible API") and docs/img2img-lora.md ("OpenAI POST /v1/images/edits")
describe them, checked on the parsers alone: every default, every allowed value and its edges, the `param` each
error names, and how a body becomes the v1 request it is served as."""

from __future__ import annotations

from typing import Any

import pytest

from sd3serve.api.openai_schemas import (
    MODEL_ALIASES,
    MODEL_ID,
    InvalidParam,
    UnknownModel,
    model_object,
    parse_edit_form,
    parse_images_request,
    request_schema,
    resolve_model,
)

PRESETS = {"1024x1024": (1024, 1024), "1344x768": (1344, 768), "768x1344": (768, 1344), "1536x640": (1536, 640),
           "640x1536": (640, 1536), "1216x832": (1216, 832), "832x1216": (832, 1216), "1088x896": (1088, 896),
           "896x1088": (896, 1088), "256x256": (256, 256), "512x512": (512, 512), "1536x1024": (1536, 1024),
           "1024x1536": (1024, 1536), "1792x1024": (1792, 1024), "1024x1792": (1024, 1792)}  # fmt: skip


def param_of(body: Any) -> str | None:
    with pytest.raises(InvalidParam) as e:
        parse_images_request(body)
    return e.value.param


# --- POST /v1/images/generations --------------------------------------------------------------------------------


def test_the_defaults() -> None:
    parsed = parse_images_request({"prompt": "a red circle"})
    req = parsed.txt2img
    assert parsed.response_format == "url"
    assert (req.width, req.height) == (1024, 1024)  # size auto
    assert req.batch_size == 1 and req.image_format.value == "png" and req.image_quality == 95
    assert req.seed == -1  # no seed: a random one
    assert req.base64 is True
    # The v1 contract's own defaults for the extensions.
    assert req.steps == 4 and req.guidance_scale == 1.0 and req.negative_prompt == "low quality, blurry"
    assert req.sampler.value == "dpmpp_2m" and req.scheduler.value == "sgm_uniform"


def test_nulls_are_the_defaults() -> None:
    body = {"prompt": "p", "model": None, "n": None, "size": None, "response_format": None, "output_format": None,
            "output_compression": None, "user": None, "quality": None, "style": None, "background": None,
            "moderation": None, "stream": None, "seed": None, "steps": None}  # fmt: skip
    parsed = parse_images_request(body)
    req = parsed.txt2img
    assert parsed.response_format == "url"
    assert (req.width, req.height, req.batch_size, req.image_quality, req.seed) == (1024, 1024, 1, 95, -1)
    assert req.image_format.value == "png" and req.steps == 4


@pytest.mark.parametrize(("size", "wh"), sorted(PRESETS.items()))
def test_every_size_is_width_by_height(size: str, wh: tuple[int, int]) -> None:
    req = parse_images_request({"prompt": "p", "size": size}).txt2img
    assert (req.width, req.height) == wh


@pytest.mark.parametrize("size", ["1024X1024", "1000x1000", "1024x1024 ", "auto2", "", "2048x2048"])
def test_another_size_is_400_listing_the_sizes(size: str) -> None:
    with pytest.raises(InvalidParam) as e:
        parse_images_request({"prompt": "p", "size": size})
    assert e.value.param == "size"
    for allowed in ("auto", *PRESETS):
        assert allowed in str(e.value)


def test_extensions_are_v1s_fields() -> None:
    body = {"prompt": "p", "seed": 7, "negative_prompt": "grey", "steps": 9, "guidance_scale": 2.5,
            "sampler": "euler", "scheduler": "karras", "n": 3}  # fmt: skip
    req = parse_images_request(body).txt2img
    assert (req.seed, req.negative_prompt, req.steps, req.guidance_scale) == (7, "grey", 9, 2.5)
    assert (req.sampler.value, req.scheduler.value, req.batch_size) == ("euler", "karras", 3)


@pytest.mark.parametrize(("n", "ok"), [(1, True), (10, True), (0, False), (11, False), (4.0, True), (4.5, False),
                                       ("4", False), (True, False)])  # fmt: skip
def test_n_edges(n: Any, ok: bool) -> None:
    if ok:
        assert parse_images_request({"prompt": "p", "n": n}).txt2img.batch_size == int(n)
    else:
        assert param_of({"prompt": "p", "n": n}) == "n"


@pytest.mark.parametrize(("given", "quality"), [(0, 10), (9, 10), (10, 10), (11, 11), (55, 55), (100, 100)])
def test_output_compression_below_10_counts_as_10(given: int, quality: int) -> None:
    req = parse_images_request({"prompt": "p", "output_format": "jpeg", "output_compression": given}).txt2img
    assert req.image_quality == quality and req.image_format.value == "jpeg"


@pytest.mark.parametrize("given", [-1, 101, 50.5, "50"])
def test_output_compression_out_of_range_is_400(given: Any) -> None:
    assert param_of({"prompt": "p", "output_compression": given}) == "output_compression"


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_output_formats(fmt: str) -> None:
    assert parse_images_request({"prompt": "p", "output_format": fmt}).txt2img.image_format.value == fmt


def test_response_formats() -> None:
    assert parse_images_request({"prompt": "p", "response_format": "b64_json"}).response_format == "b64_json"
    assert parse_images_request({"prompt": "p", "response_format": "url"}).response_format == "url"
    assert param_of({"prompt": "p", "response_format": "png"}) == "response_format"


def test_ignored_fields_are_accepted() -> None:
    body = {"prompt": "p", "user": "u1", "quality": "hd", "style": "natural", "moderation": "low",
            "background": "opaque", "stream": False, "unknown": 1}  # fmt: skip
    assert parse_images_request(body).txt2img.prompt == "p"


@pytest.mark.parametrize(("field", "value"), [("background", "transparent"), ("stream", True), ("style", "x"),
                                              ("quality", "ultra"), ("moderation", "high"), ("user", 5)])  # fmt: skip
def test_refused_values_name_their_field(field: str, value: Any) -> None:
    assert param_of({"prompt": "p", field: value}) == field


def test_strict_json_types() -> None:
    assert param_of({"prompt": "p", "stream": 0}) == "stream"  # 0 is not false
    assert param_of({"prompt": 5}) == "prompt"


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 10001])
def test_prompt_edges(prompt: str) -> None:
    assert param_of({"prompt": prompt}) == "prompt"


def test_a_prompt_of_10000_characters_is_accepted() -> None:
    assert len(parse_images_request({"prompt": "x" * 10000}).txt2img.prompt) == 10000


def test_a_missing_prompt_is_400_saying_what_is_allowed() -> None:
    with pytest.raises(InvalidParam) as e:
        parse_images_request({"n": 1})
    assert e.value.param == "prompt" and "required" in str(e.value) and "10000" in str(e.value)


@pytest.mark.parametrize("body", [[], "prompt", None, 3])
def test_a_body_that_is_not_an_object_is_400_without_a_param(body: Any) -> None:
    assert param_of(body) is None


def test_an_extension_out_of_v1s_range_names_the_extension() -> None:
    assert param_of({"prompt": "p", "steps": 71}) == "steps"
    assert param_of({"prompt": "p", "seed": -2}) == "seed"
    assert param_of({"prompt": "p", "sampler": "nope"}) == "sampler"


@pytest.mark.parametrize("model", [MODEL_ID, *MODEL_ALIASES])
def test_the_model_and_its_aliases(model: str) -> None:
    assert resolve_model(model) == MODEL_ID
    assert parse_images_request({"prompt": "p", "model": model}).txt2img.prompt == "p"


def test_another_model_is_404_model_not_found() -> None:
    with pytest.raises(UnknownModel) as e:
        parse_images_request({"prompt": "p", "model": "dall-e-3"})
    assert e.value.param == "model" and e.value.code == "model_not_found"
    assert "dall-e-3" in str(e.value) and MODEL_ID in str(e.value)
    with pytest.raises(UnknownModel):
        resolve_model("SD3.5-LARGE-TURBO")


def test_the_model_object() -> None:
    obj = model_object()
    assert (obj.id, obj.object, obj.owned_by, obj.created) == (MODEL_ID, "model", "stabilityai", 1729555200)


def test_the_documented_schema_has_the_extensions_with_v1s_defaults() -> None:
    props = request_schema()["properties"]
    assert props["seed"]["default"] == -1
    assert props["steps"]["default"] == 4 and props["guidance_scale"]["default"] == 1.0
    assert props["sampler"]["default"] == "dpmpp_2m" and props["scheduler"]["default"] == "sgm_uniform"
    for name in ("seed", "negative_prompt", "steps", "guidance_scale", "sampler", "scheduler", "loras"):
        assert {"type": "null"} in props[name]["anyOf"]
        assert props[name]["description"].startswith("extension, as in the v1 contract")
    assert props["size"]["enum"][0] == "auto" and set(PRESETS) <= set(props["size"]["enum"])


# --- POST /v1/images/edits (multipart form fields) -----------------------------------------------------------------


def edit_param(fields: dict[str, list[str]], *, has_mask: bool = False) -> str | None:
    with pytest.raises(InvalidParam) as e:
        parse_edit_form(fields, has_mask=has_mask)
    return e.value.param


def test_edit_defaults() -> None:
    parsed = parse_edit_form({"prompt": ["a blue circle"]}, has_mask=False)
    req = parsed.img2img
    assert parsed.response_format == "b64_json"
    assert req.strength == 0.7 and req.seed == -1 and req.batch_size == 1
    assert req.image_format.value == "png" and req.image_quality == 95 and req.base64 is True
    assert req.loras is None or req.loras == []


def test_edit_fields_are_read_as_their_types() -> None:
    fields = {"prompt": ["p"], "n": ["2"], "seed": ["-1"], "steps": ["6"], "guidance_scale": ["1.5"],
              "strength": [".25"], "size": ["512x512"], "response_format": ["url"], "output_format": ["webp"],
              "output_compression": ["5"], "negative_prompt": ["grey"], "sampler": ["euler"],
              "scheduler": ["simple"], "user": ["ignored"], "quality": ["x"], "input_fidelity": ["high"]}  # fmt: skip
    parsed = parse_edit_form(fields, has_mask=False)
    req = parsed.img2img
    assert parsed.response_format == "url"
    assert (req.batch_size, req.seed, req.steps, req.guidance_scale, req.strength) == (2, -1, 6, 1.5, 0.25)
    assert (req.width, req.height) == (512, 512)
    assert req.image_format.value == "webp" and req.image_quality == 10  # below 10 counts as 10
    assert (req.negative_prompt, req.sampler.value, req.scheduler.value) == ("grey", "euler", "simple")


def test_edit_size_auto_keeps_the_image_size_unset() -> None:
    for fields in ({"prompt": ["p"]}, {"prompt": ["p"], "size": ["auto"]}):
        req = parse_edit_form(fields, has_mask=False).img2img
        assert "width" not in req.model_fields_set and "height" not in req.model_fields_set


def test_edit_output_compression_edges() -> None:
    for given, quality in (("0", 10), ("10", 10), ("11", 11), ("100", 100)):
        req = parse_edit_form({"prompt": ["p"], "output_compression": [given]}, has_mask=False).img2img
        assert req.image_quality == quality


@pytest.mark.parametrize(("fields", "param"), [
    ({"n": ["2"]}, "prompt"),
    ({"prompt": ["p"], "size": ["1000x1000"]}, "size"),
    ({"prompt": ["p"], "response_format": ["png"]}, "response_format"),
    ({"prompt": ["p"], "output_format": ["gif"]}, "output_format"),
    ({"prompt": ["p"], "background": ["transparent"]}, "background"),
    ({"prompt": ["p"], "n": ["two"]}, "n"),
    ({"prompt": ["p"], "n": ["1.5"]}, "n"),
    ({"prompt": ["p"], "seed": ["1234567890123"]}, "seed"),
    ({"prompt": ["p"], "strength": ["high"]}, "strength"),
    ({"prompt": ["p"], "guidance_scale": ["1,5"]}, "guidance_scale"),
    ({"prompt": ["p", "q"]}, "prompt"),
    ({"prompt": ["p"], "n": ["11"]}, "n"),
    ({"prompt": ["p"], "output_format": ["png"], "steps": ["71"]}, "steps"),
    ({"prompt": ["p"], "strength": ["1.5"]}, "strength"),
])  # fmt: skip
def test_edit_errors_name_their_param(fields: dict[str, list[str]], param: str) -> None:
    assert edit_param(fields) == param


def test_edit_numbers_in_text() -> None:
    ok = {"prompt": ["p"], "seed": [" 4294967295 "], "guidance_scale": ["1e0"], "strength": ["0.5"]}
    req = parse_edit_form(ok, has_mask=False).img2img
    assert req.seed == 4294967295 and req.guidance_scale == 1.0 and req.strength == 0.5


def test_a_mask_is_400_param_mask() -> None:
    assert edit_param({"prompt": ["p"]}, has_mask=True) == "mask"


def test_edit_model_aliases_and_another_model() -> None:
    assert parse_edit_form({"prompt": ["p"], "model": [MODEL_ALIASES[0]]}, has_mask=False).img2img.prompt == "p"
    with pytest.raises(UnknownModel):
        parse_edit_form({"prompt": ["p"], "model": ["dall-e-2"]}, has_mask=False)


def test_loras_as_nested_form_fields() -> None:
    fields = {"prompt": ["p"], "loras[][name]": ["a", "b"], "loras[][scale]": ["0.5", "2"]}
    loras = parse_edit_form(fields, has_mask=False).img2img.loras
    assert [(lo.name, lo.scale) for lo in loras or []] == [("a", 0.5), ("b", 2.0)]
    without_scales = parse_edit_form({"prompt": ["p"], "loras[][name]": ["a"]}, has_mask=False).img2img.loras
    assert [(lo.name, lo.scale) for lo in without_scales or []] == [("a", 1.0)]


def test_loras_scales_must_match_the_names() -> None:
    assert edit_param({"prompt": ["p"], "loras[][name]": ["a", "b"], "loras[][scale]": ["1"]}) == "loras"
    assert edit_param({"prompt": ["p"], "loras[][name]": ["a"], "loras[][scale]": ["strong"]}) == "loras"
    assert edit_param({"prompt": ["p"], "loras[][name]": ["a"], "loras[][scale]": ["5"]}) == "loras"  # -4..4


def test_loras_as_a_json_string() -> None:
    listed = parse_edit_form({"prompt": ["p"], "loras": ['[{"name": "a", "scale": -1.5}]']}, has_mask=False)
    assert [(lo.name, lo.scale) for lo in listed.img2img.loras or []] == [("a", -1.5)]
    single = parse_edit_form({"prompt": ["p"], "loras": ['{"name": "b"}']}, has_mask=False)
    assert [lo.name for lo in single.img2img.loras or []] == ["b"]
    assert edit_param({"prompt": ["p"], "loras": ["not json"]}) == "loras"


# --- what an error says: the field, the rule, and what was sent ---------------------------------------------------


def message_of(body: Any) -> str:
    with pytest.raises(InvalidParam) as e:
        parse_images_request(body)
    return str(e.value)


def test_a_body_that_is_not_an_object_says_so() -> None:
    with pytest.raises(InvalidParam) as e:
        parse_images_request(["a red circle"])
    assert e.value.param is None and "must be a JSON object" in str(e.value)


@pytest.mark.parametrize(("body", "echo"), [({"prompt": "x", "n": "4"}, "(got '4')"),
                                            ({"prompt": "x", "response_format": "png"}, "(got 'png')"),
                                            ({"prompt": "x", "output_compression": 4.5}, "(got 4.5)")])  # fmt: skip
def test_an_invalid_value_is_echoed_with_the_rule(body: dict[str, Any], echo: str) -> None:
    message = message_of(body)
    field = next(k for k in body if k != "prompt")
    assert message.startswith(f"{field}: invalid value; allowed: ") and message.endswith(echo)


def test_an_unknown_model_is_named_cut_to_100_characters() -> None:
    name = "m" * 99 + "xyz" + "m" * 48
    with pytest.raises(UnknownModel) as e:
        resolve_model(name)
    assert repr(name[:100]) in str(e.value) and repr(name[:101]) not in str(e.value)
    assert MODEL_ID in str(e.value)


def test_edit_loras_with_fewer_scales_than_names_say_so() -> None:
    fields = {"prompt": ["x"], "loras[][name]": ["a", "b"], "loras[][scale]": ["0.5"]}
    with pytest.raises(InvalidParam) as e:
        parse_edit_form(fields, has_mask=False)
    assert e.value.param == "loras" and "give a scale for every adapter" in str(e.value)
