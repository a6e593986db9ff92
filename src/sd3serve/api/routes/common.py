"""What the generation routes share in their wire format: the model slug, the route declarations (their responses
from ``api/contract.py``), the credit headers, and the answers of a synchronous request (the image, or JSON with
base64 images) and of a v2 submission."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from sd3serve.api.body import read_json
from sd3serve.api.contract import IMAGE_RESPONSES, SUBMIT_RESPONSES
from sd3serve.api.deps import GenerationKeyDep, IdempotencyKeyDep, ServicesDep
from sd3serve.api.middleware import CLIENT_CLOSED_REQUEST as CLIENT_CLOSED
from sd3serve.api.schemas import Base64ImagesResponse
from sd3serve.imaging import to_base64
from sd3serve.service import ClientGone, Delivery, GenerationService, KeyInfo, Order, Output, Services
from sd3serve.settings import Settings

__all__ = [
    "CLIENT_CLOSED",
    "MODEL_SLUG",
    "GenerationCall",
    "GenerationCallDep",
    "SubmitResponse",
    "asynchronous_route",
    "base_url",
    "cost_headers",
    "delivery_headers",
    "image_response",
    "request_body",
    "synchronous_route",
    "until_disconnected",
]

MODEL_SLUG = "stable-diffusion-3.5-turbo-txt2img"
Route = TypeVar("Route", bound=Callable[..., Any])

def request_body(component: str) -> dict[str, Any]:  # pragma: no mutate block (runs at import)
    """The body as ``openapi_extra`` (the route reads it itself); the component is added in ``app.py``."""
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def synchronous_route(
    router: APIRouter, path: str, summary: str, body: str
) -> Callable[[Route], Route]:  # pragma: no mutate block (runs at import)
    """A synchronous generation route: it answers the image (or JSON with base64 images) or a generation error;
    ``body`` names the request's schema component."""
    return router.post(path, summary=summary, response_class=Response, openapi_extra=request_body(body),
                       responses=IMAGE_RESPONSES)  # fmt: skip


def asynchronous_route(
    router: APIRouter, path: str, summary: str, body: str
) -> Callable[[Route], Route]:  # pragma: no mutate block (runs at import)
    """A v2 submission route: it answers the task to poll."""
    return router.post(path, summary=summary, openapi_extra=request_body(body), response_model=SubmitResponse,
                       responses=SUBMIT_RESPONSES)  # fmt: skip


def credits_header(value: float) -> str:
    """Credits as a plain decimal, to the micro-credit the ledger keeps (never in exponent notation)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def cost_headers(*, cost: float, remaining: float, replayed: bool = False) -> dict[str, str]:
    headers = {"x-remaining-credits": credits_header(remaining), "x-cost": credits_header(cost)}
    if replayed:
        headers["idempotent-replayed"] = "true"  # the first answer to this Idempotency-Key, not charged again
    return headers


async def until_disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SubmitResponse(BaseModel):
    request_id: str
    status: str
    poll_url: str
    status_url: str
    response_url: str


def base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def delivery_headers(out: Delivery) -> dict[str, str]:
    headers = cost_headers(cost=out.cost, remaining=out.remaining, replayed=out.replayed) | {
        "x-generation-time": f"{out.seconds:.3f}",
        "x-seed-value": str(out.seed),
    }
    if out.prompt_truncated:
        headers["x-prompt-truncated"] = "true"  # the encoders saw only the start (CLIP 77 tokens, T5 256)
    return headers


def image_response(out: Delivery | None, output: Output) -> Response:
    """The hosted API's answer: the first image's bytes, or with base64 JSON holding every image."""
    if out is None:
        return Response(status_code=CLIENT_CLOSED)
    headers = delivery_headers(out)
    if output.base64:
        encoded = [to_base64(f) for f in out.files]
        body = Base64ImagesResponse(image=encoded[0], images=encoded, seed=out.seed)
        return JSONResponse(body.model_dump(), headers=headers)
    return Response(content=out.files[0], media_type=output.media_type, headers=headers)


@dataclass(frozen=True)
class GenerationCall:
    """What every generation route works with: the request, its key (counted against its rate limit), the service,
    and the request's id and Idempotency-Key."""

    request: Request
    key: KeyInfo
    service: GenerationService
    settings: Settings
    request_id: str
    idempotency_key: str | None

    @classmethod
    def of(cls, request: Request, key: KeyInfo, services: Services, idempotency_key: str | None) -> GenerationCall:
        rid: str = request.state.request_id  # RequestContextMiddleware's
        return cls(request, key, services.service, services.settings, rid, idempotency_key)

    async def body(self, *, images: bool = False) -> Any:
        """The JSON body, within the body limit (the larger one for routes that take an image)."""
        limit = self.settings.max_body_bytes
        return await read_json(self.request, limit=max(limit, self.settings.max_image_body_bytes) if images else limit)

    async def run_now(self, order: Order) -> Delivery | None:
        """Run the order while the client waits; None if the client went away first (nothing was charged)."""
        try:
            return await self.service.generate(
                self.key, order, request_id=self.request_id, idempotency_key=self.idempotency_key,
                disconnected=lambda: until_disconnected(self.request),
            )  # fmt: skip
        except ClientGone:
            return None

    async def submit(self, order: Order) -> JSONResponse:
        """A v2 submission and its answer: the task to poll."""
        base = base_url(self.request, self.settings)
        submitted = await self.service.submit(self.key, order, request_id=self.request_id,
                                              idempotency_key=self.idempotency_key, base_url=base)  # fmt: skip
        status_url = f"{base}/v2/requests/{submitted.task_id}/status"
        body = SubmitResponse(
            request_id=submitted.task_id, status="QUEUED", poll_url=status_url, status_url=status_url,
            response_url=f"{base}/v2/requests/{submitted.task_id}",
        )  # fmt: skip
        headers = cost_headers(cost=submitted.cost, remaining=submitted.remaining, replayed=submitted.replayed)
        return JSONResponse(body.model_dump(), headers=headers)


async def generation_call(
    request: Request, key: GenerationKeyDep, services: ServicesDep, idempotency_key: IdempotencyKeyDep = None,
) -> GenerationCall:
    return GenerationCall.of(request, key, services, idempotency_key)


GenerationCallDep = Annotated[GenerationCall, Depends(generation_call)]
