"""The HTTP server's own limits (uvicorn): a deadline for request headers, a deadline for a client to take what
is written to it, keep-alive, a connection cap answered with the API's JSON error, and which proxies may set the
client's address and scheme. ``sd3serve serve`` runs uvicorn with these options."""

from __future__ import annotations

import asyncio
import json
import logging
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
    _header_timer: asyncio.TimerHandle | None = None
    _write_timer: asyncio.TimerHandle | None = None

    def __init__(
        self, config: Config, server_state: ServerState, app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:  # fmt: skip
        super().__init__(config, server_state, app_state, _loop)
        self.connection_cap, self.limit_concurrency = self.limit_concurrency, None  # uvicorn's check is off
        self.app = self._capped(self.app)

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
        self._expect_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        self._cancel_write_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The send buffer is full: the client must take some of it within ``write_timeout_s``."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.write_timeout_s, self._write_timed_out)

    def resume_writing(self) -> None:
        self._cancel_write_timer()
        super().resume_writing()

    def _cancel_write_timer(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _write_timed_out(self) -> None:
        self._write_timer = None
        if not self.transport.is_closing():
            log.info("a client took nothing for %g s: connection closed", self.write_timeout_s)
        self.transport.abort()  # close() would wait to flush what the client does not take

    def _expect_headers(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        waiting_for_headers = self.cycle is None or self.cycle.response_complete
        if waiting_for_headers and not self.transport.is_closing():
            self.transport.close()


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
