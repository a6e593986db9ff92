"""``POST /v1/stable-diffusion-3.5-turbo-txt2img``: synchronous generation, charged on delivery."""

from __future__ import annotations

from fastapi import APIRouter, Response

from sd3serve.api.routes.common import MODEL_SLUG, GenerationCallDep, image_response, synchronous_route
from sd3serve.api.schemas import parse_txt2img

router = APIRouter(tags=["generation"])


@synchronous_route(router, f"/v1/{MODEL_SLUG}", "Generate images (synchronous)", "Txt2ImgRequestV1")
async def txt2img_v1(call: GenerationCallDep) -> Response:
    order = parse_txt2img(await call.body()).order("v1")
    return image_response(await call.run_now(order), order.output)
