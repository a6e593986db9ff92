"""Bodies of the OpenAI-compatible images API (``POST /v1/images/generations``, ``GET /v1/models``).

An OpenAI body is translated into the contract's :class:`Txt2ImgRequest`, so the generation itself, its limits
and its prices are the same as v1's. Errors carry the OpenAI ``param`` they are about (``api/errors.py`` renders
them in OpenAI's shape on these routes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)

from sd3serve.api.schemas import (
    ASPECT_RATIOS,
    MAX_BATCH_SIZE,
    NOT_BLANK,
    Img2ImgRequest,
    Txt2ImgRequest,
    parse_img2img,
    parse_txt2img,
)
from sd3serve.errors import InvalidRequest, NotFound

MODEL_ID = "sd3.5-large-turbo"
MODEL_ALIASES = ("stable-diffusion-3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo",
                 "stable-diffusion-3.5-turbo-txt2img")  # fmt: skip
MODEL_CREATED = 1729555200  # 2024-10-22, the release of SD3.5 Large Turbo
MODEL_OWNER = "stabilityai"

# The contract's aspect-ratio presets, OpenAI's own sizes, and "auto" (1024x1024).
SIZES: dict[str, tuple[int, int]] = {
    "auto": (1024, 1024),
    **{f"{w}x{h}": (w, h) for w, h in (p for p in ASPECT_RATIOS.values() if p)},
    **{s: (int(s.split("x")[0]), int(s.split("x")[1]))
       for s in ("256x256", "512x512", "1536x1024", "1024x1536", "1792x1024", "1024x1792")},
}  # fmt: skip
# The contract's defaults where OpenAI has none of its own; the seed is random unless given, as OpenAI's images are.
DEFAULT_SEED = -1
DEFAULT_COMPRESSION = 95
EXTENSIONS = ("seed", "negative_prompt", "steps", "guidance_scale", "sampler", "scheduler", "loras")


class InvalidParam(InvalidRequest):
    """Bad input in one field of an OpenAI body (400, ``param`` names it)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class UnknownModel(NotFound):
    """A model id this server does not serve (404 ``model_not_found``, as OpenAI answers)."""

    param = "model"
    code = "model_not_found"

    def __init__(self, model: object) -> None:
        names = ", ".join((MODEL_ID, *MODEL_ALIASES))
        super().__init__(f"the model {str(model)[:100]!r} does not exist; this server serves {names}")


def resolve_model(model: str) -> str:
    if model == MODEL_ID or model in MODEL_ALIASES:
        return MODEL_ID
    raise UnknownModel(model)


def _json_integer(v: Any) -> Any:
    """JSON Schema's integer (4 and 4.0, but not "4", true or 4.5), or null."""
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError("Input should be a valid integer")
    return int(v)


_INT = BeforeValidator(_json_integer)


def _no_streaming(v: bool | None) -> bool | None:
    if v:
        raise ValueError("streaming is not supported")
    return v


_OpenAIQuality = Literal["auto", "standard", "hd", "low", "medium", "high"]


class ImagesRequest(BaseModel):
    """OpenAI's image generation body. ``null`` is the default for every optional field; unknown fields are
    ignored. ``seed``, ``negative_prompt``, ``steps``, ``guidance_scale``, ``sampler`` and ``scheduler`` are
    extensions with the v1 contract's rules."""

    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as published: 0 is not false

    prompt: Annotated[
        str, Field(min_length=1, max_length=10000, pattern=NOT_BLANK, description="1..10000 characters")
    ]
    model: Annotated[str | None, Field(description=f"{MODEL_ID} (or an alias); default {MODEL_ID}")] = None
    n: Annotated[int | None, Field(ge=1, le=MAX_BATCH_SIZE, description="images; image i uses seed + i"), _INT] = 1
    size: Annotated[str | None, Field(json_schema_extra={"enum": list(SIZES)}, description="WIDTHxHEIGHT")] = "auto"
    response_format: Literal["url", "b64_json"] | None = Field(
        "url", description="url: a data: URL holding the image; b64_json: the base64 of the image"
    )
    output_format: Literal["png", "jpeg", "webp"] | None = "png"
    output_compression: Annotated[
        int | None, Field(ge=0, le=100, description="jpeg/webp quality; below 10 counts as 10"), _INT
    ] = DEFAULT_COMPRESSION
    user: Annotated[str | None, Field(description="accepted and ignored")] = None
    quality: _OpenAIQuality | None = Field(None, description="accepted and ignored")
    style: Literal["vivid", "natural"] | None = Field(None, description="accepted and ignored")
    background: Literal["auto", "opaque"] | None = Field(None, description="transparent backgrounds are not made")
    moderation: Literal["auto", "low"] | None = Field(None, description="accepted and ignored")
    stream: Annotated[
        bool | None, AfterValidator(_no_streaming),
        WithJsonSchema({"anyOf": [{"const": False}, {"type": "null"}], "description": "only false: no streaming"}),
    ] = None  # fmt: skip


_ALLOWED: dict[str, str] = {
    "prompt": "a string of 1 to 10000 characters, not blank",
    "model": f"{MODEL_ID} or one of its aliases",
    "n": f"an integer from 1 to {MAX_BATCH_SIZE}",
    "size": "one of " + ", ".join(SIZES),
    "response_format": "url or b64_json",
    "output_format": "png, jpeg or webp",
    "output_compression": "an integer from 0 to 100",
    "user": "a string",
    "quality": "auto, standard, hd, low, medium or high (ignored)",
    "style": "vivid or natural (ignored)",
    "background": "auto or opaque",
    "moderation": "auto or low (ignored)",
    "stream": "false (streaming is not supported)",
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class ParsedImagesRequest:
    txt2img: Txt2ImgRequest
    response_format: str


def parse_images_request(body: Any) -> ParsedImagesRequest:
    """Validate an OpenAI body and translate it; every problem is an InvalidParam naming the field."""
    if not isinstance(body, dict):
        raise InvalidParam(None, "the request body must be a JSON object")
    try:
        req = ImagesRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]  # the first problem, as OpenAI reports one param
        field = str(err["loc"][0]) if err["loc"] else "body"
        if err["type"] == "missing":
            raise InvalidParam(field, f"{field}: required; allowed: {_ALLOWED.get(field, 'see the docs')}") from None
        problem = f"invalid value; allowed: {_ALLOWED[field]}" if field in _ALLOWED else err["msg"]
        raise InvalidParam(field, f"{field}: {problem} (got {_short(err.get('input'))})") from None
    if req.size is not None and req.size not in SIZES:
        raise InvalidParam("size", f"size: {req.size[:60]!r} is not a supported size; allowed: {', '.join(SIZES)}")
    if req.model is not None:
        resolve_model(req.model)
    width, height = SIZES[req.size or "auto"]
    compression = DEFAULT_COMPRESSION if req.output_compression is None else max(10, req.output_compression)
    fields: dict[str, Any] = {
        "prompt": req.prompt,
        "seed": DEFAULT_SEED,
        **{name: body[name] for name in EXTENSIONS if body.get(name) is not None},
        "width": width,
        "height": height,
        "batch_size": req.n or 1,
        "image_format": req.output_format or "png",
        "image_quality": compression,
        "base64": True,
    }
    try:
        txt2img = parse_txt2img(fields, single_image_body=False)
    except InvalidRequest as e:
        field = str(e).split(":", 1)[0]
        raise InvalidParam(field if field in fields else None, str(e)) from None
    return ParsedImagesRequest(txt2img=txt2img, response_format=req.response_format or "url")


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="the base64 of the image (response_format b64_json)")
    url: str | None = Field(default=None, description="a data: URL holding the image (response_format url)")
    revised_prompt: str | None = Field(default=None, description="never set: prompts are used as given")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix time, seconds")
    data: list[ImageData]


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, insufficient_quota, requests, server_error")
    param: str | None = Field(description="the request field the error is about")
    code: str | None = Field(description="invalid_api_key, model_not_found, insufficient_quota, ...")


class OpenAIErrorResponse(BaseModel):
    error: OpenAIErrorBody


def model_object() -> ModelObject:
    return ModelObject(id=MODEL_ID, created=MODEL_CREATED, owned_by=MODEL_OWNER)


def request_schema() -> dict[str, Any]:
    """The documented body: OpenAI's fields plus the extensions, with the contract's schemas for the latter."""
    schema = ImagesRequest.model_json_schema()
    contract = Txt2ImgRequest.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]
    for name in EXTENSIONS:
        field = {key: value for key, value in contract[name].items() if key not in ("default", "description")}
        schema["properties"][name] = {
            "anyOf": [field, {"type": "null"}],
            "default": DEFAULT_SEED if name == "seed" else contract[name]["default"],
            "description": "extension, as in the v1 contract" + (f": {contract[name]['description']}"
                                                                if "description" in contract[name] else ""),
        }  # fmt: skip
    return schema


# --- POST /v1/images/edits (multipart) -------------------------------------------------------------------------

EDIT_INTS = ("n", "output_compression", "seed", "steps")
EDIT_FLOATS = ("guidance_scale", "strength")
EDIT_TEXTS = ("prompt", "model", "size", "response_format", "output_format", "negative_prompt", "sampler",
              "scheduler", "user", "quality", "background", "input_fidelity")  # fmt: skip
EDIT_IGNORED = ("user", "quality", "input_fidelity")
_INT_TEXT = re.compile(r"^-?\d{1,12}$")
_FLOAT_TEXT = re.compile(r"^-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?$")


@dataclass(frozen=True)
class ParsedEditRequest:
    img2img: Img2ImgRequest
    response_format: str


def _form_value(name: str, values: list[str]) -> Any:
    if len(values) != 1:
        raise InvalidParam(name, f"{name}: give one value (got {len(values)})")
    text = values[0]
    if name in EDIT_INTS:
        if not _INT_TEXT.match(text.strip()):
            raise InvalidParam(name, f"{name}: must be an integer (got {_short(text)})")
        return int(text)
    if name in EDIT_FLOATS:
        if not _FLOAT_TEXT.match(text.strip()):
            raise InvalidParam(name, f"{name}: must be a number (got {_short(text)})")
        return float(text)
    return text


def _form_loras(fields: dict[str, list[str]]) -> list[dict[str, Any]] | None:
    """``loras`` as OpenAI's clients send nested extra_body fields in a form (``loras[][name]``,
    ``loras[][scale]``), or as a JSON string."""
    if "loras" in fields:
        try:
            value = json.loads(fields["loras"][0])
        except ValueError:
            raise InvalidParam("loras", 'loras: a JSON list of {"name", "scale"} objects') from None
        return value if isinstance(value, list) else [value]
    names, scales = fields.get("loras[][name]"), fields.get("loras[][scale]")
    if names is None:
        return None
    if scales is not None and len(scales) != len(names):
        raise InvalidParam("loras", "loras: give a scale for every adapter, or none")
    out: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        entry: dict[str, Any] = {"name": name}
        if scales is not None:
            if not _FLOAT_TEXT.match(scales[i].strip()):
                raise InvalidParam("loras", f"loras: a scale must be a number (got {_short(scales[i])})")
            entry["scale"] = float(scales[i])
        out.append(entry)
    return out


def parse_edit_form(fields: dict[str, list[str]], *, has_mask: bool) -> ParsedEditRequest:
    """The text fields of an edits form, translated into an image-to-image request (the image comes after)."""
    if has_mask:
        raise InvalidParam("mask", "mask: inpainting is not supported; send the image without a mask "
                                   "(the whole image is edited, as image-to-image with strength)")  # fmt: skip
    values: dict[str, Any] = {}
    for name in (*EDIT_INTS, *EDIT_FLOATS, *EDIT_TEXTS):
        if name in fields:
            values[name] = _form_value(name, fields[name]) if name not in EDIT_IGNORED else None
    if "prompt" not in values:
        raise InvalidParam("prompt", "prompt: required; allowed: " + _ALLOWED["prompt"])
    if values.get("model") is not None:
        resolve_model(values["model"])
    size = values.get("size") or "auto"
    if size != "auto" and size not in SIZES:
        raise InvalidParam("size", f"size: {size[:60]!r} is not a supported size; allowed: {', '.join(SIZES)}")
    response_format = values.get("response_format") or "b64_json"
    if response_format not in ("url", "b64_json"):
        raise InvalidParam("response_format", "response_format: invalid value; allowed: url or b64_json")
    output_format = values.get("output_format") or "png"
    if output_format not in ("png", "jpeg", "webp"):
        raise InvalidParam("output_format", "output_format: invalid value; allowed: png, jpeg or webp")
    if values.get("background") == "transparent":
        raise InvalidParam("background", "background: transparent backgrounds are not made; allowed: auto, opaque")
    compression = values.get("output_compression")
    body: dict[str, Any] = {
        "prompt": values["prompt"],
        "image": "-",  # replaced by the uploaded file
        "seed": DEFAULT_SEED,
        **{k: values[k] for k in ("seed", "negative_prompt", "steps", "guidance_scale", "sampler", "scheduler",
                                  "strength") if values.get(k) is not None},
        "batch_size": values.get("n") or 1,
        "image_format": output_format,
        "image_quality": DEFAULT_COMPRESSION if compression is None else max(10, min(100, compression)),
        "base64": True,
    }  # fmt: skip
    loras = _form_loras(fields)
    if loras is not None:
        body["loras"] = loras
    if size != "auto":
        body["width"], body["height"] = SIZES[size]
    try:
        req = parse_img2img(body, single_image_body=False)
    except InvalidRequest as e:
        field = str(e).split(":", 1)[0].split(".", 1)[0]
        field = {"batch_size": "n", "image_format": "output_format", "image_quality": "output_compression"}.get(
            field, field
        )
        raise InvalidParam(field, str(e)) from None
    return ParsedEditRequest(img2img=req, response_format=response_format)
