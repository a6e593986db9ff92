"""The OpenAI-compatible images API: ``POST /v1/images/generations``, ``GET /v1/models[/{model}]``.

The body is translated into the v1 contract's request and run by the same generation service, with the same keys,
credits, limits and charges (on delivery only). Keys come as ``Authorization: Bearer`` or ``x-api-key``; errors
are OpenAI's shape (``api/errors.py``).

``response_format: url`` answers a ``data:`` URL holding the image: OpenAI's URLs are fetchable without the key
for an hour, and a data: URL is too (browsers, ``urllib``, Node's ``fetch``), forever, with nothing stored here
and no secret link to leak; the cost is the size of base64 in the response, as with ``b64_json``.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from sd3serve.api.contract import GENERATION_HEADERS, error, header_refs
from sd3serve.api.deps import (
    BearerGenerationKeyDep,
    BearerKeyDep,
    IdempotencyKeyDep,
    ServicesDep,
)
from sd3serve.api.images_in import decode_image
from sd3serve.api.openai_schemas import (
    ImageData,
    ImagesResponse,
    InvalidParam,
    ModelList,
    ModelObject,
    OpenAIErrorResponse,
    model_object,
    parse_edit_form,
    parse_images_request,
    request_schema,
    resolve_model,
)
from sd3serve.api.routes.common import CLIENT_CLOSED, GenerationCall, delivery_headers
from sd3serve.blocking import run_blocking
from sd3serve.errors import InvalidRequest
from sd3serve.imaging import to_base64
from sd3serve.service import Order

router = APIRouter(tags=["OpenAI-compatible"])


def _errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:  # pragma: no mutate block (runs at import)
    return {code: error(code, text, OpenAIErrorResponse) for code, text in codes.items()}


_AUTH_ERRORS = {401: "Missing, unknown or revoked key (`invalid_api_key`)"}
_GENERATION_ERRORS = _errors({
    400: "Bad input (`invalid_request_error`); `param` names the field",
    **_AUTH_ERRORS,
    404: "Unknown model (`model_not_found`)",
    409: "A request with the same Idempotency-Key is still running; retry after Retry-After seconds",
    422: "The Idempotency-Key was used with another request body",
    429: "Not enough credits (type and code `insufficient_quota`; nothing charged), or the key's rate limit "
         "(`rate_limit_exceeded`, with `Retry-After`)",
    500: "The server failed (`server_error`); nothing is charged",
    503: "The queue is full or the server was interrupted (`server_error`); nothing is charged, retry after "
         "Retry-After seconds",
})  # fmt: skip
# The body limit is enforced before routing (api/middleware.py), in the contract's shape.
_GENERATION_ERRORS[413] = error(413, 'Request body too large (`{"error": "..."}`)')
_HEADERS = header_refs(*GENERATION_HEADERS)


@router.post(
    "/v1/images/generations",
    summary="Generate images (OpenAI's images API)",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}},
    responses={200: {"description": "The images", "headers": _HEADERS}, **_GENERATION_ERRORS},
)
async def create_images(
    request: Request, key: BearerGenerationKeyDep, services: ServicesDep, idempotency_key: IdempotencyKeyDep = None
) -> Response:
    call = GenerationCall.of(request, key, services, idempotency_key)
    parsed = parse_images_request(await call.body())
    return await _images_response(call, parsed.txt2img.order("openai"), parsed.response_format)


async def _images_response(call: GenerationCall, order: Order, response_format: str) -> Response:
    out = await call.run_now(order)
    if out is None:
        return Response(status_code=CLIENT_CLOSED)
    encoded = [to_base64(f) for f in out.files]
    if response_format == "url":
        data = [ImageData(url=f"data:{order.output.media_type};base64,{b}") for b in encoded]
    else:
        data = [ImageData(b64_json=b) for b in encoded]
    body = ImagesResponse(created=int(time.time()), data=data)
    return JSONResponse(body.model_dump(exclude_none=True), headers=delivery_headers(out))


_EDIT_FORM = {
    "type": "object",
    "required": ["image", "prompt"],
    "properties": {
        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP (also as image[])"},
        "prompt": {"type": "string", "minLength": 1, "maxLength": 10000, "pattern": "\\S"},
        "mask": {"type": "string", "format": "binary", "description": "not supported: a 400 (no inpainting)"},
        "n": {"type": "integer", "minimum": 1, "maximum": 10},
        "size": {"type": "string", "description": "auto (the image's size) or a WIDTHxHEIGHT of /generations"},
        "response_format": {"type": "string", "enum": ["url", "b64_json"], "default": "b64_json"},
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "strength": {"type": "number", "minimum": 0, "maximum": 1, "default": 0.7, "description": "extension"},
    },
}


@router.post(
    "/v1/images/edits",
    summary="Edit an image (OpenAI's images API): image-to-image with strength; masks are not supported",
    response_model=ImagesResponse,
    response_model_exclude_none=True,
    openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _EDIT_FORM}}}},
    responses={200: {"description": "The images", "headers": _HEADERS}, **_GENERATION_ERRORS},
)
async def edit_images(
    request: Request, key: BearerGenerationKeyDep, services: ServicesDep, idempotency_key: IdempotencyKeyDep = None
) -> Response:
    settings = services.settings
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise InvalidParam(None, "send the edit as multipart/form-data (image, prompt, ...)")
    try:
        form = await request.form(max_files=4, max_fields=200, max_part_size=1024 * 1024)
    except HTTPException as e:
        raise InvalidParam(None, f"malformed form: {e.detail}") from None
    try:
        fields: dict[str, list[str]] = {}
        files: dict[str, list[UploadFile]] = {}
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, []).append(value)
            else:
                files.setdefault(name.removesuffix("[]"), []).append(value)
        parsed = parse_edit_form(fields, has_mask="mask" in files or "mask" in fields)
        images = files.get("image", [])
        if len(images) != 1:
            raise InvalidParam("image", f"image: send exactly one image file (got {len(images)})")
        data = await images[0].read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise InvalidParam("image", f"image: the image is too large; at most {settings.max_image_bytes} bytes")
    finally:
        await form.close()
    req = parsed.img2img
    try:
        image = await run_blocking(decode_image, data, field="image", settings=settings)
        await run_blocking(req.attach, image)
    except InvalidParam:
        raise
    except InvalidRequest as e:
        raise InvalidParam("image", str(e)) from None
    call = GenerationCall.of(request, key, services, idempotency_key)
    return await _images_response(call, req.order("openai-edits"), parsed.response_format)


@router.get("/v1/models", summary="The models served (OpenAI's models API)", responses=_errors(_AUTH_ERRORS))
def list_models(key: BearerKeyDep) -> ModelList:
    return ModelList(data=[model_object()])


@router.get(
    "/v1/models/{model:path}",
    summary="One model (OpenAI's models API); aliases answer with the model they name",
    responses=_errors({**_AUTH_ERRORS, 404: "Unknown model (`model_not_found`)"}),
)
def retrieve_model(model: str, key: BearerKeyDep) -> ModelObject:
    resolve_model(model)
    return model_object()
