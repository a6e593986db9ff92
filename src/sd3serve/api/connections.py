"""The HTTP server's own limits (uvicorn): a deadline for request headers, a deadline for a client to take what
is written to it, keep-alive, a connection cap answered with the API's JSON error, and which proxies may set the
client's address and scheme. ``sd3serve serve`` runs uvicorn with these options."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from sd3serve.settings import Settings

log = logging.getLogger(__name__)

AT_CAPACITY = "the server is at its connection limit (SD3SERVE_MAX_CONNECTIONS); retry shortly"
AT_CAPACITY_RETRY_AFTER_S = 1


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, a deadline for the client to take what
    the server writes, and the connection cap answered as ``{"error"}`` JSON.

    uvicorn has no header deadline of its own: its keep-alive timer starts only after a first response and stops
    at the first byte of the next request, so a client that never finishes its headers holds its connection
    forever. Nor a write deadline: a client that stops reading holds its response (and what it holds) forever; here
    a connection whose send buffer stays full for ``write_timeout_s`` is cut off. uvicorn's own cap answers
    ``text/plain``: the cap (``limit_concurrency``, same rule: the connections, or the requests in progress) is
    applied here instead.
    """

    header_timeout_s: float = 10.0
    write_timeout_s: float = 60.0

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:  # fmt: skip
        super().__init__(config, server_state, app_state, _loop)
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's check is off
        self.app = self._capped(self.app)
        self._headers_due = _Deadline(self.loop, self.header_timeout_s, self._headers_timed_out)
        self._write_due = _Deadline(self.loop, self.write_timeout_s, self._write_timed_out)

    def _capped(self, app: ASGIApp) -> ASGIApp:
        async def capped(scope: Scope, receive: Receive, send: Send) -> None:
            cap = self.connection_cap
            # This request's own task is counted in ``tasks`` already (uvicorn counts it after its check).
            if cap is not None and (len(self.connections) >= cap or len(self.tasks) > cap):
                log.warning("connection limit reached (%d): a request was refused with 503", cap)
                await _at_capacity(send)
                return
            await app(scope, receive, send)

        return capped

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_due.arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._headers_due.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._headers_due.cancel()
        self._write_due.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The send buffer is full: the client must take some of it within ``write_timeout_s``."""
        super().pause_writing()
        if not self._write_due.armed:
            self._write_due.arm()

    def resume_writing(self) -> None:
        self._write_due.cancel()
        super().resume_writing()

    def _write_timed_out(self) -> None:
        if not self.transport.is_closing():
            log.info("a client took nothing for %g s: connection closed", self.write_timeout_s)
        self.transport.abort()  # close() would wait to flush what the client does not take

    def _headers_timed_out(self) -> None:
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


class _Deadline:
    """One deadline of a connection: ``arm`` (re)starts it, ``cancel`` stops it; when it passes, ``expired`` runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop, seconds: float, expired: Callable[[], None]) -> None:
        self._loop, self._seconds, self._expired = loop, seconds, expired
        self._handle: asyncio.TimerHandle | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        self.cancel()
        self._handle = self._loop.call_later(self._seconds, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._expired()


async def _at_capacity(send: Send) -> None:
    body = json.dumps({"error": AT_CAPACITY}).encode()
    headers = [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(AT_CAPACITY_RETRY_AFTER_S).encode()), (b"connection", b"close"),
    ]  # fmt: skip
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def with_header_timeout(seconds: float, write_timeout_s: float = 60.0) -> type[HeaderTimeoutH11Protocol]:
    attributes = {"header_timeout_s": seconds, "write_timeout_s": write_timeout_s}
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), attributes)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``uvicorn.run`` / ``uvicorn.Config`` for these settings."""
    trusted_proxies = settings.forwarded_allow_ips.strip()
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "access_log": False,  # the app writes its own (api/middleware.py)
        "http": with_header_timeout(settings.header_timeout_s, settings.write_timeout_s),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections or None,
        # X-Forwarded-For/-Proto only from the configured proxies; by default from nobody.
        "proxy_headers": bool(trusted_proxies),
        "forwarded_allow_ips": trusted_proxies or None,
    }
