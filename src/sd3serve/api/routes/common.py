"""What the generation routes share in their wire format: the model slug, documented errors, the credit headers."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from sd3serve.api.middleware import CLIENT_CLOSED_REQUEST as CLIENT_CLOSED
from sd3serve.api.schemas import ErrorResponse

__all__ = ["CLIENT_CLOSED", "GENERATION_ERRORS", "MODEL_SLUG", "cost_headers", "request_body", "until_disconnected"]

MODEL_SLUG = "stable-diffusion-3.5-turbo-txt2img"

GENERATION_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "Bad input: the error names the field, what was wrong and what is allowed",
        401: "Missing, unknown or revoked API key",
        406: "Not enough credits",
        409: "A request with the same Idempotency-Key is still running; retry after Retry-After seconds",
        413: "Request body too large",
        422: "The Idempotency-Key was used with another request body",
        500: "The server failed; nothing is charged",
        503: "The queue is full, the request waited too long, or the server was interrupted; nothing is charged, "
        "retry after Retry-After seconds",
    }.items()
}


def request_body(component: str) -> dict[str, Any]:
    """The body as ``openapi_extra`` (the route reads it itself); the component is added in ``app.py``."""
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def credits_header(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:g}"


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
