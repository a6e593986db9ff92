"""The one place where errors become HTTP responses: ``{"error": "..."}`` with the contract's status, or, on the
OpenAI-compatible routes (``OPENAI_PATHS``), OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with
OpenAI's status."""

from __future__ import annotations

import logging
import math
import re
import time
from datetime import UTC, datetime

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from sd3serve.api.middleware import KNOWN_METHODS
from sd3serve.errors import (
    DatabaseUnavailable,
    Forbidden,
    GenerationFailed,
    IdempotencyConflict,
    IdempotencyInProgress,
    InsufficientCredits,
    InvalidApiKey,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RateLimited,
    ReservationLost,
    SD3ServeError,
    StorageFull,
    TooManyStreams,
)

log = logging.getLogger(__name__)

STATUS: dict[type[SD3ServeError], int] = {
    InvalidRequest: 400,
    InvalidApiKey: 401,
    NotFound: 404,
    Forbidden: 403,
    InsufficientCredits: 406,
    IdempotencyInProgress: 409,
    IdempotencyConflict: 422,
    PayloadTooLarge: 413,
    RateLimited: 429,
    TooManyStreams: 429,
    GenerationFailed: 500,
    Overloaded: 503,
    DatabaseUnavailable: 503,
    ReservationLost: 503,
}

HTTP_MESSAGES = {
    404: "not found: no such path or model",
    405: "method not allowed on this path",
}


# OpenAI's error type and code per domain error; its status where it differs from the contract's.
OPENAI_KIND: dict[type[SD3ServeError], tuple[str, str | None]] = {
    InvalidRequest: ("invalid_request_error", None),
    InvalidApiKey: ("invalid_request_error", "invalid_api_key"),
    NotFound: ("invalid_request_error", None),
    InsufficientCredits: ("insufficient_quota", "insufficient_quota"),
    PayloadTooLarge: ("invalid_request_error", "request_too_large"),
    RateLimited: ("requests", "rate_limit_exceeded"),
    Overloaded: ("server_error", "overloaded"),
    DatabaseUnavailable: ("server_error", "service_unavailable"),
    ReservationLost: ("server_error", "service_unavailable"),
}
OPENAI_STATUS: dict[type[SD3ServeError], int] = {InsufficientCredits: 429}  # OpenAI reports an empty quota so
OPENAI_PATHS = ("/v1/images", "/v1/models")


def is_openai_path(path: str) -> bool:
    return any(path == prefix or path.startswith(prefix + "/") for prefix in OPENAI_PATHS)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def openai_error_response(
    status: int, message: str, headers: dict[str, str] | None = None, *, exc: Exception | None = None
) -> JSONResponse:
    kind = next((k for cls, k in OPENAI_KIND.items() if isinstance(exc, cls)), None)
    error_type, code = kind or ("server_error" if status >= 500 else "invalid_request_error", None)
    body = {"message": message, "type": error_type, "param": getattr(exc, "param", None),
            "code": getattr(exc, "code", None) or code}  # fmt: skip
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _respond(
    request: Request, status: int, message: str, headers: dict[str, str] | None = None, exc: Exception | None = None
) -> JSONResponse:
    """The error in the shape of the route's API."""
    if is_openai_path(request.url.path):
        return openai_error_response(status, message, headers, exc=exc)
    return error_response(status, message, headers)


def _status(exc: SD3ServeError, request: Request) -> int:
    table = {**STATUS, **OPENAI_STATUS} if is_openai_path(request.url.path) else STATUS
    return next((code for cls, code in table.items() if isinstance(exc, cls)), 500)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SD3ServeError)
    status = _status(exc, request)
    headers = None
    if isinstance(exc, StorageFull):
        status, headers = (503, {"Retry-After": "60"}) if exc.server_wide else (429, {"Retry-After": "60"})
    if isinstance(exc, Overloaded | TooManyStreams):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, IdempotencyInProgress):
        headers = {"Retry-After": "1"}
    elif isinstance(exc, DatabaseUnavailable | ReservationLost):
        headers = {"Retry-After": "5"}
    elif isinstance(exc, RateLimited):
        reset = datetime.fromtimestamp(exc.reset_at, UTC)
        headers = {
            "x-rate-limit-reset-at-utc": reset.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "Retry-After": str(max(1, math.ceil(exc.reset_at - time.time()))),
        }
    if status == 500:
        log.error("request %s failed: %s", getattr(request.state, "request_id", "-"), exc)
    elif status >= 500:  # refused for the server's state (queue, database, a lost hold): operators want to know
        log.warning("request %s: %d %s: %s", getattr(request.state, "request_id", "-"), status, type(exc).__name__, exc)
    return _respond(request, status, str(exc), headers, exc)


def _allowed_methods(request: Request) -> str:
    """Every method some route answers on this path: asked of the routes themselves (the app's route list holds
    included routers, which have no path of their own). HEAD wherever GET (api/middleware.py)."""
    methods = {
        method
        for method in KNOWN_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in request.app.routes)
    }
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = HTTP_MESSAGES.get(exc.status_code) or str(exc.detail)
    headers = dict(exc.headers) if exc.headers else {}
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request)
    return _respond(request, exc.status_code, message, headers or None)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    return _respond(request, 400, "; ".join(parts))


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("request %s: database error: %s", getattr(request.state, "request_id", "-"), type(exc).__name__)
    return _respond(request, 503, "the credit database is unavailable; nothing was charged, retry shortly",
                    {"Retry-After": "5"}, DatabaseUnavailable())  # fmt: skip


INT64_MAX = 2**63 - 1


async def _overflow(request: Request, exc: Exception) -> JSONResponse:
    """A safety net for integer path parameters a route forgot to bound: past 64 bits the database overflows."""
    digits = {name: re.fullmatch(r"[+-]?0*([0-9]+)", str(value)) for name, value in request.path_params.items()}
    too_big = [name for name, m in digits.items() if m and (len(m[1]) > 19 or int(m[1]) > INT64_MAX)]
    if too_big:
        return _respond(request, 400, f"path.{too_big[0]}: out of range; at most {INT64_MAX}")
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Never a stack trace to the client; the log has it.
    log.exception("request %s: unhandled error", getattr(request.state, "request_id", "-"))
    return _respond(request, 500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SD3ServeError, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(OverflowError, _overflow)
    app.add_exception_handler(Exception, _unexpected)
