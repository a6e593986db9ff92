"""``POST /v1/stable-diffusion-3.5-turbo-txt2img``: synchronous generation, charged on delivery."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from sd3serve.api.body import read_json
from sd3serve.api.deps import GenerationKeyDep, IdempotencyKeyDep, RequestIdDep, ServiceDep, SettingsDep
from sd3serve.api.routes.common import (
    CLIENT_CLOSED,
    GENERATION_ERRORS,
    MODEL_SLUG,
    cost_headers,
    request_body,
    until_disconnected,
)
from sd3serve.api.schemas import Base64ImagesResponse, parse_txt2img
from sd3serve.api.service import ClientGone
from sd3serve.imaging import to_base64

router = APIRouter(tags=["generation"])

@router.post(
    f"/v1/{MODEL_SLUG}",
    summary="Generate images (synchronous)",
    response_class=Response,
    openapi_extra=request_body("Txt2ImgRequestV1"),
    responses={
        200: {
            "description": "The image bytes (base64 false) or JSON with base64 images (base64 true)",
            "content": {
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
                "image/webp": {"schema": {"type": "string", "format": "binary"}},
                "application/json": {"schema": Base64ImagesResponse.model_json_schema()},
            },
        },
        **GENERATION_ERRORS,
    },
)
async def txt2img_v1(
    request: Request, key: GenerationKeyDep, service: ServiceDep, settings: SettingsDep, request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:  # fmt: skip
    req = parse_txt2img(await read_json(request, limit=settings.max_body_bytes))
    try:
        out = await service.generate(key, req, request_id=request_id, idempotency_key=idempotency_key,
                                     disconnected=lambda: until_disconnected(request))  # fmt: skip
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    headers = cost_headers(cost=out.cost, remaining=out.remaining, replayed=out.replayed) | {
        "x-generation-time": f"{out.seconds:.3f}",
        "x-seed-value": str(out.seed),
    }
    if out.prompt_truncated:
        headers["x-prompt-truncated"] = "true"  # the encoders saw only the start (CLIP 77 tokens, T5 256)
    if req.base64:
        encoded = [to_base64(f) for f in out.files]
        body = Base64ImagesResponse(image=encoded[0], images=encoded, seed=out.seed)
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(content=out.files[0], media_type=req.image_format.media_type, headers=headers)
