"""``POST /v1|v2/stable-diffusion-3.5-turbo-img2img``: image-to-image, on the one generation path.

The body is the txt2img body plus ``image`` (base64 or an http(s) URL) and ``strength``; the image is fetched,
checked and decoded here (``api/images_in.py``), scaled to the output size off the event loop, and the request
then goes through the same service, ledger and engine as txt2img.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from sd3serve.api.body import read_json
from sd3serve.api.deps import GenerationKeyDep, IdempotencyKeyDep, RequestIdDep, ServiceDep, SettingsDep
from sd3serve.api.images_in import load_image
from sd3serve.api.routes.common import (
    CLIENT_CLOSED,
    GENERATION_ERRORS,
    cost_headers,
    request_body,
    until_disconnected,
)
from sd3serve.api.routes.v2 import SubmitResponse, base_url
from sd3serve.api.schemas import Base64ImagesResponse, Img2ImgRequest, parse_img2img, parse_webhook
from sd3serve.api.service import ClientGone
from sd3serve.imaging import to_base64
from sd3serve.settings import Settings

IMG2IMG_SLUG = "stable-diffusion-3.5-turbo-img2img"
IMAGE_INPUT_PATHS = (f"/v1/{IMG2IMG_SLUG}", f"/v2/{IMG2IMG_SLUG}", "/v1/images/edits")

router = APIRouter(tags=["image-to-image"])

_IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The image bytes (base64 false) or JSON with base64 images (base64 true)",
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": Base64ImagesResponse.model_json_schema()},
        },
    },
}


async def with_image(req: Img2ImgRequest, settings: Settings) -> Img2ImgRequest:
    """The request with its start image fetched, checked, decoded and scaled (400 for any problem)."""
    image = await load_image(req.image, field="image", settings=settings)
    await run_in_threadpool(req.attach, image)
    return req


@router.post(
    f"/v1/{IMG2IMG_SLUG}",
    summary="Image-to-image (synchronous)",
    response_class=Response,
    openapi_extra=request_body("Img2ImgRequestV1"),
    responses={**_IMAGE_RESPONSES, **GENERATION_ERRORS},
)
async def img2img_v1(
    request: Request, key: GenerationKeyDep, service: ServiceDep, settings: SettingsDep, request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> Response:  # fmt: skip
    body = await read_json(request, limit=max(settings.max_body_bytes, settings.max_image_body_bytes))
    req = await with_image(parse_img2img(body), settings)
    try:
        out = await service.generate(key, req, request_id=request_id, idempotency_key=idempotency_key,
                                     route="v1-img2img", disconnected=lambda: until_disconnected(request))  # fmt: skip
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    headers = cost_headers(cost=out.cost, remaining=out.remaining, replayed=out.replayed) | {
        "x-generation-time": f"{out.seconds:.3f}",
        "x-seed-value": str(out.seed),
    }
    if out.prompt_truncated:
        headers["x-prompt-truncated"] = "true"
    if req.base64:
        encoded = [to_base64(f) for f in out.files]
        return JSONResponse(Base64ImagesResponse(image=encoded[0], images=encoded, seed=out.seed).model_dump(),
                            headers=headers)  # fmt: skip
    return Response(content=out.files[0], media_type=req.image_format.media_type, headers=headers)


@router.post(
    f"/v2/{IMG2IMG_SLUG}",
    summary="Submit an image-to-image request (asynchronous)",
    openapi_extra=request_body("Img2ImgRequestV2"),
    response_model=SubmitResponse,
    responses=GENERATION_ERRORS,
)
async def img2img_v2(
    request: Request, key: GenerationKeyDep, service: ServiceDep, settings: SettingsDep, request_id: RequestIdDep,
    idempotency_key: IdempotencyKeyDep = None,
) -> JSONResponse:  # fmt: skip
    body = await read_json(request, limit=max(settings.max_body_bytes, settings.max_image_body_bytes))
    req = await with_image(parse_img2img(body, single_image_body=False), settings)
    base = base_url(request, settings)
    submitted = await service.submit(key, req, request_id=request_id, idempotency_key=idempotency_key,
                                     webhook=parse_webhook(body), base_url=base, route="v2-img2img")  # fmt: skip
    status_url = f"{base}/v2/requests/{submitted.task_id}/status"
    body_out = SubmitResponse(
        request_id=submitted.task_id, status="QUEUED", poll_url=status_url, status_url=status_url,
        response_url=f"{base}/v2/requests/{submitted.task_id}",
    )  # fmt: skip
    headers = cost_headers(cost=submitted.cost, remaining=submitted.remaining, replayed=submitted.replayed)
    return JSONResponse(body_out.model_dump(), headers=headers)
