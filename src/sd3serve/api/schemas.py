"""Request and response bodies of the hosted API (``shared/spec/api-contract.md``).

The sampler and scheduler enums are built from the torch-free catalogue (which the sampler and schedule
tables must match), so a name exists in one place and importing this module loads no tensor library.
"""

from __future__ import annotations

import dataclasses
import secrets
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from PIL import Image
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    computed_field,
    field_validator,
)

from sd3serve.catalogue import SAMPLER_NAMES, SCHEDULER_NAMES
from sd3serve.errors import InvalidRequest
from sd3serve.imaging import ImageFormat
from sd3serve.service import GenerationJob, InitImage, Order, Output, Webhook

Sampler = StrEnum("Sampler", {name: name for name in SAMPLER_NAMES})  # type: ignore[misc]
Scheduler = StrEnum("Scheduler", {name: name for name in SCHEDULER_NAMES})  # type: ignore[misc]

ASPECT_RATIOS: dict[str, tuple[int, int] | None] = {
    "custom": None,
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "9:16": (768, 1344),
    "21:9": (1536, 640),
    "9:21": (640, 1536),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "5:4": (1088, 896),
    "4:5": (896, 1088),
}
AspectRatio = StrEnum("AspectRatio", {name: name for name in ASPECT_RATIOS})  # type: ignore[misc]

MAX_SEED = 2**32 - 1
MAX_BATCH_SIZE = 10
# At least one character that Python's str.strip() keeps, spelled out so that the published JSON Schema (ECMA
# regex, whose \s is a smaller set) and the server agree on what "blank" means.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def _json_integer(v: Any) -> Any:
    """JSON Schema's integer: 4 and 4.0, but not "4", true or 4.5."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError("Input should be a valid integer")
    if isinstance(v, float):
        if not v.is_integer():
            raise ValueError("Input should be a valid integer, without a fractional part")
        return int(v)
    return v


_JSON_INT = BeforeValidator(_json_integer)
SIZE_MULTIPLE = 16
MAX_LORAS = 4
LORA_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"


class LoraRequest(BaseModel):
    """One LoRA adapter of a request: a name from ``GET /v1/loras`` and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Strict(), Field(pattern=LORA_NAME, description="an adapter listed by GET /v1/loras")]
    scale: Annotated[float, Strict(), Field(ge=-4, le=4, allow_inf_nan=False, description="its strength")] = 1.0


class Txt2ImgRequest(BaseModel):
    """The body of ``POST /v1|v2/stable-diffusion-3.5-turbo-txt2img``. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", use_enum_values=False)

    # Strict primitives: the published schema's types, no coercion ("4" is not 4, 1 is not true).
    prompt: Annotated[
        str,
        Strict(),
        Field(min_length=1, max_length=10000, pattern=NOT_BLANK, description="Prompt for image generation; not blank"),
    ]
    negative_prompt: Annotated[str, Strict(), Field(max_length=10000)] = "low quality, blurry"
    steps: Annotated[int, Field(ge=1, le=70), _JSON_INT] = 4
    guidance_scale: Annotated[float, Strict(), Field(ge=1, le=15, allow_inf_nan=False)] = 1.0
    seed: Annotated[int, Field(ge=-1, le=MAX_SEED, description="-1 for a random seed"), _JSON_INT] = 98552302
    sampler: Sampler = Sampler("dpmpp_2m")
    scheduler: Scheduler = Scheduler("sgm_uniform")
    width: Annotated[int, Field(ge=64, le=2048, description="rounded down to a multiple of 16"), _JSON_INT] = 1024
    height: Annotated[int, Field(ge=64, le=2048, description="rounded down to a multiple of 16"), _JSON_INT] = 1024
    aspect_ratio: AspectRatio = AspectRatio("custom")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE), _JSON_INT] = 1
    image_format: ImageFormat = ImageFormat.jpeg
    image_quality: Annotated[int, Field(ge=10, le=100), _JSON_INT] = 95
    base64: Annotated[bool, Strict()] = False
    loras: Annotated[
        list[LoraRequest],
        Field(max_length=MAX_LORAS, description="LoRA adapters to apply, at most 4 (GET /v1/loras lists them)"),
    ] = []

    @field_validator("loras")
    @classmethod
    def _distinct_loras(cls, v: list[LoraRequest]) -> list[LoraRequest]:
        names = [lora.name for lora in v]
        if len(set(names)) != len(names):
            raise ValueError("each adapter may be named once")
        return v

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _valid_unicode(cls, v: str) -> str:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode text (it holds a lone surrogate)") from None
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, v: str) -> str:
        stripped = v.strip()
        if not stripped:
            raise ValueError("must not be empty")
        if len(stripped) > 10000:
            raise ValueError("must be at most 10000 characters")
        return stripped

    def size(self) -> tuple[int, int]:
        """(width, height) after the preset and the rounding down to a multiple of 16."""
        preset = ASPECT_RATIOS[self.aspect_ratio.value]
        w, h = preset if preset else (self.width, self.height)
        return w - w % SIZE_MULTIPLE, h - h % SIZE_MULTIPLE

    def to_job(self) -> GenerationJob:
        width, height = self.size()
        seed = secrets.randbelow(MAX_SEED + 1) if self.seed == -1 else self.seed
        return GenerationJob(
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=seed,
            sampler=self.sampler.value,
            scheduler=self.scheduler.value,
            width=width,
            height=height,
            batch_size=self.batch_size,
            loras=tuple((lora.name, lora.scale) for lora in self.loras),
        )

    def order(self, route: str, webhook: WebhookOptions | None = None) -> Order:
        """This request as the service's order; ``route`` names the kind of endpoint (an Idempotency-Key's answer
        is replayed only on the same kind)."""
        hook = None
        if webhook is not None and webhook.webhook_url is not None:
            hook = Webhook(url=webhook.webhook_url, events=tuple(webhook.webhook_events))
        output = Output(image_format=self.image_format, quality=self.image_quality, base64=self.base64)
        return Order(job=self.to_job(), output=output, request=self.model_dump_json(), route=route, webhook=hook)


def _in_words(prop: dict[str, Any], defs: dict[str, Any]) -> str:
    """A field's published schema in words: its type and limits, then its description."""
    prop = defs[prop["$ref"].rsplit("/", 1)[1]] if "$ref" in prop else prop
    options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]  # "or null": the default
    limits, note = options[0], prop.get("description", "")
    low, high = limits.get("minimum"), limits.get("maximum")
    if "enum" in limits:
        words = "one of " + ", ".join(str(v) for v in limits["enum"])
    elif limits.get("type") == "integer":
        words = f"an integer from {low} to {high}"
    elif limits.get("type") == "number":
        words = f"a finite number from {low:g} to {high:g}"
    elif limits.get("type") == "boolean":
        words = "true or false"
    elif "minLength" in limits and "maxLength" in limits:
        words = f"a string of {limits['minLength']} to {limits['maxLength']} characters"
    else:
        words = f"a string of at most {limits['maxLength']} characters"
    return f"{words} ({note})" if note else words


def _allowed(*models: type[BaseModel]) -> dict[str, str]:
    """What each field allows, in words, from the models' own schemas (the one place the limits are stated); the
    fields that hold objects or files say it themselves."""
    out = {
        "loras": f"at most {MAX_LORAS} objects {{\"name\": <an adapter of GET /v1/loras>, \"scale\": -4..4}}, "
        "each name once",
        "image": "base64 of a PNG, JPEG or WebP image, or an http(s) URL of one",
    }
    for model in models:
        schema = model.model_json_schema(mode="validation")
        for name, prop in schema["properties"].items():
            if name not in out:
                out[name] = _in_words(prop, schema.get("$defs", {}))
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_txt2img(body: Any, *, single_image_body: bool = True) -> Txt2ImgRequest:
    """Validate a decoded JSON body; any problem is an InvalidRequest naming the field and what is allowed.

    ``single_image_body``: the response body can hold one image only (v1 without base64).
    """
    return _parse(Txt2ImgRequest, body, single_image_body=single_image_body)


RequestT = TypeVar("RequestT", bound=Txt2ImgRequest)


def _parse(model: type[RequestT], body: Any, *, single_image_body: bool) -> RequestT:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        problems = []
        for err in e.errors(include_url=False):
            field = ".".join(str(p) for p in err["loc"]) or "body"
            top = str(err["loc"][0]) if err["loc"] else ""
            if err["type"] == "missing":
                problems.append(f"{field}: required; allowed: {ALLOWED.get(top, 'see the API docs')}")
                continue
            msg = {"enum": "not one of the allowed names", "string_pattern_mismatch": "must not be blank"}.get(
                err["type"], err["msg"].removeprefix("Value error, ")
            )
            allowed = ALLOWED.get(top)
            problems.append(
                f"{field}: {msg} (got {_short(err.get('input'))})" + (f"; allowed: {allowed}" if allowed else "")
            )
        raise InvalidRequest("; ".join(problems)) from None
    if single_image_body and req.batch_size > 1 and not req.base64:
        raise InvalidRequest(
            "batch_size: a response body holds one image, so batch_size > 1 needs base64: true "
            "(or use the v2 API, which returns one URL per image)"
        )
    return req


def _json_integer_or_none(v: Any) -> Any:
    return None if v is None else _json_integer(v)


class Img2ImgRequest(Txt2ImgRequest):
    """The body of ``POST /v1|v2/stable-diffusion-3.5-turbo-img2img``: the txt2img fields, ``image`` and
    ``strength``. Without width and height the picture has the image's size (scaled into 64..2048 a side, rounded
    down to a multiple of 16); with one of them, the other follows the image's aspect ratio."""

    image: Annotated[
        str,
        Strict(),
        Field(min_length=1, exclude=True, description="base64 of a PNG, JPEG or WebP image, or an http(s) URL"),
    ]
    strength: Annotated[
        float, Strict(), Field(ge=0, le=1, allow_inf_nan=False, description="0 keeps the image, 1 replaces it")
    ] = 0.7
    width: Annotated[
        int | None,
        Field(ge=64, le=2048, description="default: the image's; rounded down to a multiple of 16"),
        BeforeValidator(_json_integer_or_none),
    ] = None  # type: ignore[assignment]
    height: Annotated[
        int | None,
        Field(ge=64, le=2048, description="default: the image's; rounded down to a multiple of 16"),
        BeforeValidator(_json_integer_or_none),
    ] = None  # type: ignore[assignment]
    _init: InitImage | None = PrivateAttr(None)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def image_sha256(self) -> str:
        """The start image's digest (its pixels at the output size): stored and compared instead of the image."""
        return self._init.digest if self._init is not None else ""

    def output_size(self, image_width: int, image_height: int) -> tuple[int, int]:
        """(width, height) of the picture for an image of this size; InvalidRequest when none fits."""
        preset = ASPECT_RATIOS[self.aspect_ratio.value]
        if preset:
            w, h = preset
        elif self.width is not None and self.height is not None:
            w, h = self.width, self.height
        elif self.width is not None:
            w, h = self.width, round(self.width * image_height / image_width)
        elif self.height is not None:
            w, h = round(self.height * image_width / image_height), self.height
        else:
            scale = min(1.0, 2048 / max(image_width, image_height))
            scale = max(scale, 64 / min(image_width, image_height))
            w, h = round(image_width * scale), round(image_height * scale)
        w, h = w - w % SIZE_MULTIPLE, h - h % SIZE_MULTIPLE
        if not (64 <= w <= 2048 and 64 <= h <= 2048):
            raise InvalidRequest(
                f"image: a {image_width}x{image_height} image gives a {w}x{h} picture; allowed: 64..2048 a side "
                "(give width and height, or an image of a less extreme aspect ratio)"
            )
        return w, h

    def attach(self, image: Image.Image) -> None:
        """Fix the start image: scaled to the output size (call off the event loop: it resamples)."""
        from sd3serve.api.images_in import resized

        self._init = resized(image, *self.output_size(*image.size))

    def size(self) -> tuple[int, int]:
        if self._init is None:
            raise RuntimeError("the start image is not attached yet")
        return self._init.width, self._init.height

    def to_job(self) -> GenerationJob:
        return dataclasses.replace(super().to_job(), init=self._init, strength=self.strength)


ALLOWED = _allowed(Txt2ImgRequest, Img2ImgRequest)


def parse_img2img(body: Any, *, single_image_body: bool = True) -> Img2ImgRequest:
    """Validate an image-to-image body (the image itself is fetched and decoded afterwards)."""
    return _parse(Img2ImgRequest, body, single_image_body=single_image_body)


WebhookEvent = Literal["completed", "failed", "cancelled"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = ("completed", "failed", "cancelled")


class WebhookOptions(BaseModel):
    """v2 only: where to POST the task's outcome, signed per Standard Webhooks with the key's webhook secret."""

    model_config = ConfigDict(extra="ignore")

    webhook_url: Annotated[
        str | None,
        Strict(),
        Field(
            max_length=2000,
            # scheme, a host name or IPv4 address, a port that exists, a path: what the server can check and reach
            pattern=r"^https?://[A-Za-z0-9._~-]+(:(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|"
            r"[1-5][0-9]{4}|[0-9]{1,4}))?([/?#][^\x00-\x20\x7f]*)?$",
            description="http(s) URL that receives the outcome (POST, JSON, signed); it must resolve to public "
            "addresses, and the key needs a webhook secret (POST /v1/webhook-secret)",
        ),
    ] = None
    webhook_events: Annotated[
        list[WebhookEvent],
        Field(min_length=1, description="which outcomes to send; default all three"),
    ] = list(WEBHOOK_EVENTS)


def parse_webhook(body: Any) -> WebhookOptions | None:
    """The webhook fields of a v2 body (already known to be an object), or None when it asks for none."""
    try:
        options = WebhookOptions.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest(f"{field}: {err['msg']} (got {_short(err.get('input'))})") from None
    return options if options.webhook_url is not None else None


class Base64ImagesResponse(BaseModel):
    image: str = Field(description="base64 of the first image")
    images: list[str] = Field(description="base64 of every image, in seed order")
    seed: int


class CreditsResponse(BaseModel):
    credits: float


class ErrorResponse(BaseModel):
    error: str


def openapi_request_schemas() -> dict[str, Any]:
    """Component schemas for the request bodies: v2 takes any batch; v1 needs base64 for batch_size > 1."""
    hooks = WebhookOptions.model_json_schema(ref_template="#/components/schemas/{model}")["properties"]

    def v1_and_v2(name: str, v2_description: str) -> None:
        ref = {"$ref": f"#/components/schemas/{name}"}
        components[f"{name}V1"] = {
            "allOf": [ref],
            "description": "One response body holds one image: batch_size above 1 needs base64 true.",
            "if": {"properties": {"batch_size": {"minimum": 2}}, "required": ["batch_size"]},
            "then": {"properties": {"base64": {"const": True}}, "required": ["base64"]},
        }
        components[f"{name}V2"] = {
            "allOf": [ref, {"type": "object", "properties": hooks}],
            "description": v2_description,
        }

    schema = Txt2ImgRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = schema.pop("$defs", {})
    components["Txt2ImgRequest"] = schema
    v1_and_v2("Txt2ImgRequest", "The v1 body, plus optional webhook fields.")
    i2i = Img2ImgRequest.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation")
    components.update(i2i.pop("$defs", {}))
    i2i["properties"].pop("image_sha256", None)
    components["Img2ImgRequest"] = i2i
    v1_and_v2("Img2ImgRequest", "The v1 image-to-image body, plus optional webhook fields.")
    return components
