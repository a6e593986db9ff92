"""What the API promises across its routes, declared once: the response headers, the errors of each kind of route,
and the security schemes. Routes declare their responses from here (so renaming a route keeps its documentation),
``api/docs.py`` publishes the headers and schemes as components, and the handlers send the headers named here."""

from __future__ import annotations

from typing import Any

from sd3serve.api.schemas import Base64ImagesResponse, ErrorResponse

Responses = dict[int | str, dict[str, Any]]

# Header name -> (JSON Schema type, description): published as components/headers, referenced by the responses.
HEADERS: dict[str, tuple[str, str]] = {
    "x-request-id": ("string", "This request's id, also in the access log"),
    "x-remaining-credits": ("string", "The key's credits after this request's cost was set aside"),
    "x-cost": ("string", "Credits this request costs (price per image x images)"),
    "x-generation-time": ("string", "Seconds the generation took"),
    "x-seed-value": ("string", "The seed used (the drawn one when seed was -1); image i used seed + i"),
    "x-prompt-truncated": ("string", "`true` when the text encoders saw only the start of a prompt"),
    "Retry-After": ("integer", "Seconds to wait before retrying"),
    "x-rate-limit-reset-at-utc": ("string", "When this key's rate-limit window resets (ISO 8601, UTC)"),
    "Allow": ("string", "The methods this path answers"),
}
GENERATION_HEADERS = ("x-remaining-credits", "x-cost", "x-generation-time", "x-seed-value", "x-prompt-truncated")
SUBMIT_HEADERS = ("x-remaining-credits", "x-cost")

# Header name -> (security scheme, description). A route that takes one of these headers gets the scheme.
SECURITY_HEADERS = {
    "x-api-key": ("ApiKey", "Your API key (`sd3serve keys create`, or POST /admin/keys)"),
    "x-admin-key": ("AdminKey", "The admin key (SD3SERVE_ADMIN_KEY); enables /admin/..."),
}


def header_refs(*names: str) -> dict[str, dict[str, str]]:
    """References to documented headers; a name not in HEADERS is an error (it would be a dangling reference)."""
    unknown = [name for name in names if name not in HEADERS]
    if unknown:
        raise KeyError(f"undocumented headers {unknown}: add them to HEADERS")
    return {name: {"$ref": f"#/components/headers/{name}"} for name in names}


# The headers an error status comes with, on every route that answers it.
ERROR_HEADERS: dict[int, tuple[str, ...]] = {
    409: ("Retry-After",),
    429: ("x-rate-limit-reset-at-utc", "Retry-After"),
    503: ("Retry-After",),
}


def error(status: int, description: str, model: type[Any] = ErrorResponse) -> dict[str, Any]:
    """The documentation of an error answer: its body model and the headers that come with its status."""
    out: dict[str, Any] = {"model": model, "description": description}
    if status in ERROR_HEADERS:
        out["headers"] = header_refs(*ERROR_HEADERS[status])
    return out


GENERATION_ERRORS: Responses = {
    status: error(status, text)
    for status, text in {
        400: "Bad input: the error names the field, what was wrong and what is allowed",
        401: "Missing, unknown or revoked API key",
        406: "Not enough credits",
        409: "A request with the same Idempotency-Key is still running; retry after Retry-After seconds",
        413: "Request body too large",
        422: "The Idempotency-Key was used with another request body",
        500: "The server failed; nothing is charged",
        503: "The queue is full, the request waited too long, or the server was interrupted; nothing is charged, "
        "retry after Retry-After seconds; also while the model is still loading",
        429: "Over this key's rate limit (SD3SERVE_RATE_LIMIT_PER_MINUTE); retry later",
    }.items()
}

# A synchronous generation: the first image's bytes, or JSON with every image in base64.
IMAGE_RESPONSES: Responses = {
    200: {
        "description": "The image bytes (base64 false) or JSON with base64 images (base64 true)",
        "content": {
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/webp": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": Base64ImagesResponse.model_json_schema()},
        },
        "headers": header_refs(*GENERATION_HEADERS),
    },
    **GENERATION_ERRORS,
}
SUBMIT_RESPONSES: Responses = {200: {"headers": header_refs(*SUBMIT_HEADERS)}, **GENERATION_ERRORS}

TASK_ERRORS: Responses = {
    400: error(400, "A path parameter is out of range"),
    401: error(401, "Missing, unknown or revoked API key"),
    404: error(404, "No such task for this key"),
}
STREAM_ERRORS: Responses = {
    429: error(429, "This key holds as many open streams (event streams, base64 result downloads) as it may "
                    "(SD3SERVE_MAX_STREAMS_PER_KEY); retry after Retry-After seconds"),
    503: error(503, "The server holds as many open streams as it allows (SD3SERVE_MAX_STREAMS); retry after "
                    "Retry-After seconds"),
}  # fmt: skip

READINESS_RESPONSES: Responses = {
    503: {
        "description": 'Not ready: `{"status": "loading"}` while the model loads and warms up, '
        '`{"status": "unhealthy", "error"}` when the engine cannot serve',
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
}
