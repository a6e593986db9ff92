"""``POST /v1/stable-diffusion-3.5-turbo-txt2img``: synchronous generation, charged on delivery."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sd3serve.api.body import read_json
from sd3serve.api.deps import EngineDep, GenerationKeyDep, MetricsDep, RequestIdDep, SettingsDep, StoreDep
from sd3serve.api.generation import generate_unless_disconnected
from sd3serve.api.schemas import Base64ImagesResponse, ErrorResponse, parse_txt2img
from sd3serve.imaging import to_base64

MODEL_SLUG = "stable-diffusion-3.5-turbo-txt2img"

router = APIRouter(tags=["generation"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input: the error names the field, what was wrong and what is allowed",
        401: "Missing, unknown or revoked API key",
        406: "Not enough credits",
        413: "Request body too large",
        500: "The server failed; nothing is charged",
        503: "The queue is full or the request waited too long; retry after Retry-After seconds",
    }.items()
}


def request_body(component: str) -> dict[str, Any]:
    """The body as ``openapi_extra`` (the route reads it itself); the component is added in ``app.py``."""
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def credits_header(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


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
        **ERRORS,
    },
)
async def txt2img_v1(
    request: Request,
    key: GenerationKeyDep,
    store: StoreDep,
    engine: EngineDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    request_id: RequestIdDep,
) -> Response:
    req = parse_txt2img(await read_json(request, limit=settings.max_body_bytes))
    job = req.to_job()
    cost = settings.price_per_image * job.batch_size
    hold = await run_in_threadpool(
        store.hold, key_id=key.id, credits=cost, request_id=request_id, owner=request.app.state.instance_id
    )
    delivered = False
    try:
        out = await generate_unless_disconnected(request, engine, req, job, request_id=request_id, metrics=metrics)
        if out is None:  # the client went away: nothing to deliver, nothing charged
            return Response(status_code=499)
        remaining = await run_in_threadpool(store.capture, hold)
        delivered = True
    finally:
        if not delivered:
            await run_in_threadpool(store.release_or_defer, hold)
    metrics.images.inc(job.batch_size)
    metrics.credits_charged.inc(float(cost))

    headers = {
        "x-remaining-credits": credits_header(remaining),
        "x-cost": credits_header(float(cost)),
        "x-generation-time": f"{out.seconds:.3f}",
        "x-seed-value": str(job.seed),
    }
    if out.prompt_truncated:
        headers["x-prompt-truncated"] = "true"  # the encoders saw only the start (CLIP 77 tokens, T5 256)
    if req.base64:
        encoded = [to_base64(f) for f in out.files]
        body = Base64ImagesResponse(image=encoded[0], images=encoded, seed=job.seed)
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(content=out.files[0], media_type=req.image_format.media_type, headers=headers)
