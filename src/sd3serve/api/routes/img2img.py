"""``POST /v1|v2/stable-diffusion-3.5-turbo-img2img``: image-to-image, on the one generation path.

The body is the txt2img body plus ``image`` (base64 or an http(s) URL) and ``strength``; the image is fetched,
checked and decoded here (``api/images_in.py``), scaled to the output size off the event loop, and the request
then goes through the same service, ledger and engine as txt2img.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from sd3serve.api.images_in import load_image
from sd3serve.api.routes.common import GenerationCallDep, asynchronous_route, image_response, synchronous_route
from sd3serve.api.schemas import Img2ImgRequest, parse_img2img, parse_webhook
from sd3serve.blocking import run_blocking
from sd3serve.settings import Settings

IMG2IMG_SLUG = "stable-diffusion-3.5-turbo-img2img"
IMAGE_INPUT_PATHS = (f"/v1/{IMG2IMG_SLUG}", f"/v2/{IMG2IMG_SLUG}", "/v1/images/edits")

router = APIRouter(tags=["image-to-image"])


async def with_image(req: Img2ImgRequest, settings: Settings) -> Img2ImgRequest:
    """The request with its start image fetched, checked, decoded and scaled (400 for any problem)."""
    image = await load_image(req.image, field="image", settings=settings)
    await run_blocking(req.attach, image)
    return req


@synchronous_route(router, f"/v1/{IMG2IMG_SLUG}", "Image-to-image (synchronous)", "Img2ImgRequestV1")
async def img2img_v1(call: GenerationCallDep) -> Response:
    order = (await with_image(parse_img2img(await call.body(images=True)), call.settings)).order("v1-img2img")
    return image_response(await call.run_now(order), order.output)


@asynchronous_route(
    router, f"/v2/{IMG2IMG_SLUG}", "Submit an image-to-image request (asynchronous)", "Img2ImgRequestV2"
)
async def img2img_v2(call: GenerationCallDep) -> JSONResponse:
    body = await call.body(images=True)
    req = await with_image(parse_img2img(body, single_image_body=False), call.settings)
    return await call.submit(req.order("v2-img2img", webhook=parse_webhook(body)))
