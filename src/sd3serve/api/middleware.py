"""Pure ASGI middleware, outermost first:

- ``RequestContextMiddleware``: a request id on every response, request metrics, and a structured (JSON) access
  log line per request, without keys;
- ``HostMiddleware``: absolute URLs name the configured public URL, never what a client's ``Host`` says;
- ``HeadMiddleware``: HEAD is answered as GET without the body wherever GET exists;
- ``RequestBodyMiddleware``: every body is bounded in size and time before the app reads any of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd3serve.service.metrics import Metrics

access_log = logging.getLogger("sd3serve.access")

# h11 accepts any token as a method: label the rest "other", so /metrics stays bounded.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the response
_LOG_METHOD_CHARS = 32
_LOG_PATH_CHARS = 1024


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, with a marker saying how much was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...[{len(text) - limit} more characters]"


async def send_error(send: Send, status: int, message: str, *, close: bool = False) -> None:
    """An ``{"error"}`` response straight from middleware (the app's handlers are not involved)."""
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class HttpMiddleware:
    """Pure ASGI middleware for HTTP requests: other scopes (lifespan, websocket) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestContextMiddleware(HttpMiddleware):
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        start = time.perf_counter()
        status: int | None = None
        disconnected = False

        async def receive_watching() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive_watching, send_with_id)
        except ClientDisconnect:
            if not disconnected:
                raise
            # An abandoned upload: nobody is left to answer, and it is no server error.
        finally:
            self.metrics.in_flight.dec()
            if status is None:  # no response was sent: the client left first, or the app failed
                status = CLIENT_CLOSED_REQUEST if disconnected else 500
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"  # templates, not raw paths: bounded labels
            self.metrics.requests.labels(method_label(scope["method"]), template, str(status)).inc()
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    json.dumps(
                        {
                            "event": "access",
                            "request_id": request_id,
                            "method": clip(scope["method"], _LOG_METHOD_CHARS),
                            "path": clip(scope["path"], _LOG_PATH_CHARS),
                            "route": template,
                            "status": status,
                            "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                            "key_id": scope["state"].get("key_id"),
                            "client": (scope.get("client") or ("-",))[0],
                        }
                    )
                )


# host, IPv4 or [IPv6], with an optional port: nothing a URL could be bent with ("/", "@", "?", ...).
_HOST = re.compile(r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,251}[A-Za-z0-9_])?|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


class HostMiddleware(HttpMiddleware):
    """With ``public_url``, every absolute URL the app builds (v2 links, redirects) uses its scheme and host;
    without it, a ``Host`` that is not a plain host[:port] is a 400."""

    def __init__(self, app: ASGIApp, public_url: str | None) -> None:
        super().__init__(app)
        self.public: tuple[str, bytes] | None = None
        if public_url:
            parts = urlsplit(public_url)
            self.public = (parts.scheme, parts.netloc.encode("idna"))

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.public is not None:
            scheme, public_host = self.public
            scope["scheme"] = scheme
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"host"] + [(b"host", public_host)]
        else:
            host = Headers(scope=scope).get("host")
            if host is not None and not _HOST.fullmatch(host):
                await send_error(send, 400, "invalid Host header: expected host[:port]")
                return
        await self.app(scope, receive, send)


class HeadMiddleware:
    """HEAD is GET without the body, wherever GET exists (FastAPI's routes list only GET)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b""}
            await send(message)

        scope["method"] = "GET"
        try:
            await self.app(scope, receive, headers_only)
        finally:
            scope["method"] = "HEAD"


class RequestBodyMiddleware(HttpMiddleware):
    """Bounds every request body before any of it is read, on every route.

    A declared length over ``max_bytes`` is a 413 at once; a streamed (chunked) body is a 413 as soon as it
    passes the limit; a body not complete ``timeout_s`` after the headers is a 408. Each closes the connection,
    and the app then sees the client as gone. A response sent before the body was read (a 401 or 403 decided
    from the headers) closes the connection too, so the rest of the body is never read.
    """

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, timeout_s: float, larger: dict[str, int] | None = None
    ) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.larger = larger or {}  # path -> its own limit (routes that take an image)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        max_bytes = self.larger.get(scope["path"], self.max_bytes)
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        length = int(declared) if declared.isdigit() else None  # h11 refuses malformed lengths before us
        if length is not None and length > max_bytes:
            message = f"request body too large: {length} bytes, the limit is {max_bytes}"
            await send_error(send, 413, message, close=True)
            return
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        body_done = not chunked and not length
        refused = False
        response_started = False
        received = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def refuse(status: int, message: str) -> Message:
            nonlocal refused
            if not refused and not response_started:
                await send_error(send, status, message, close=True)
            refused = True
            return {"type": "http.disconnect"}

        async def bounded_receive() -> Message:
            nonlocal body_done, received
            if refused:
                return {"type": "http.disconnect"}
            if body_done:  # only a disconnect can come now: no deadline
                return await receive()
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                return await refuse(408, f"the request body did not arrive within {self.timeout_s:g} s")
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    return await refuse(413, f"request body too large: over {max_bytes} bytes")
                body_done = not message.get("more_body", False)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refused:  # this request was answered here; the app's answer comes too late
                return
            if message["type"] == "http.response.start":
                response_started = True
                if not body_done:
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, bounded_receive, guarded_send)
        except ClientDisconnect:
            if not refused:
                raise
