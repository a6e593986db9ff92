"""The middleware's promises (docs/serving.md, docs/guarantees.md, docs/api.md), each checked on the ASGI layer
alone: a request id on every response, metrics and access-log lines with bounded labels, 499 for a client that
left and 500 for an app that failed, `Host` checked or replaced by the public URL, HEAD as GET without the body, and
every body bounded in size and time before the app reads it (exactly the limit passes, one byte more is 413)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message, Receive, Scope, Send

from sd3serve.api.middleware import (
    HeadMiddleware,
    HostMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
    clip,
    method_label,
)
from sd3serve.service.metrics import Metrics

App = Callable[[Scope, Receive, Send], Awaitable[None]]


def scope(method: str = "POST", path: str = "/v1/x", headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "type": "http", "method": method, "path": path, "client": ("10.1.2.3", 5555), "scheme": "http",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }  # fmt: skip


def feed(*messages: Message, then_wait: bool = False) -> Receive:
    """A client sending ``messages``, then (with ``then_wait``) nothing more, else a disconnect."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    return receive


def body(data: bytes, more: bool = False) -> Message:
    return {"type": "http.request", "body": data, "more_body": more}


class Client:
    """What the server sent back."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int | None:
        starts = [m for m in self.sent if m["type"] == "http.response.start"]
        assert len(starts) <= 1, self.sent
        return starts[0]["status"] if starts else None

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def answer(status: int = 200, content: bytes = b"ok", read: bool = True) -> tuple[App, list[bytes]]:
    """An app that reads the whole body (when ``read``) and answers ``content``; the bodies it read."""
    seen: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if read:
            data = b""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                data += message.get("body", b"")
                if not message.get("more_body", False):
                    break
            seen.append(data)
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    return app, seen


def run(app: App, s: dict[str, Any], receive: Receive | None = None) -> Client:
    client = Client()
    asyncio.run(app(s, receive or feed(body(b"")), client.send))  # type: ignore[arg-type]
    return client


def count(metrics: Metrics, method: str, route: str, status: str) -> float:
    value = metrics.registry.get_sample_value(
        "sd3serve_requests_total", {"method": method, "route": route, "status": status}
    )
    return value or 0.0


# --- RequestContextMiddleware ----------------------------------------------------------------------------------


def test_every_response_gets_its_own_request_id_beside_the_apps_headers() -> None:
    app, _ = answer()
    wrapped = RequestContextMiddleware(app, Metrics())
    first, second = run(wrapped, scope()), run(wrapped, scope())
    for client in (first, second):
        assert client.status == 200 and client.body == b"ok"
        assert client.headers["content-type"] == "text/plain"
        rid = client.headers["x-request-id"]
        assert len(rid) == 32 and int(rid, 16) >= 0
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


def test_the_request_id_is_the_one_the_app_sees() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["state"]["request_id"])
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = run(RequestContextMiddleware(app, Metrics()), scope())
    assert seen == [client.headers["x-request-id"]]


class Route:
    path = "/v2/requests/{task_id}"


def test_requests_are_counted_by_method_route_template_and_status() -> None:
    metrics = Metrics()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = Route()
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = RequestContextMiddleware(app, metrics)
    run(wrapped, scope("GET", "/v2/requests/abc"))
    run(wrapped, scope("GET", "/v2/requests/def"))
    assert count(metrics, "GET", "/v2/requests/{task_id}", "404") == 2
    plain, _ = answer(201)
    run(RequestContextMiddleware(plain, metrics), scope("BREW", "/no/such/path"))
    assert count(metrics, "other", "unmatched", "201") == 1
    assert metrics.registry.get_sample_value("sd3serve_requests_in_flight") == 0


def test_unknown_methods_are_other_and_known_ones_keep_their_name() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"):
        assert method_label(method) == method
    assert method_label("get") == "other" and method_label("BREW") == "other"


def test_clip_cuts_with_a_marker_saying_how_much() -> None:
    assert clip("abcdef", 6) == "abcdef"
    assert clip("abcdefg", 6) == "abcdef...[1 more characters]"
    assert clip("x" * 10, 4) == "xxxx...[6 more characters]"


def test_a_client_that_left_is_499_and_an_app_that_failed_is_500() -> None:
    metrics = Metrics()

    async def reads_then_gone(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise ClientDisconnect()

    run(RequestContextMiddleware(reads_then_gone, metrics), scope(), feed())
    assert count(metrics, "POST", "unmatched", "499") == 1

    async def fails(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        run(RequestContextMiddleware(fails, metrics), scope())
    assert count(metrics, "POST", "unmatched", "500") == 1

    async def disconnect_without_leaving(scope: Scope, receive: Receive, send: Send) -> None:
        raise ClientDisconnect()  # the app says so, but no disconnect came from the client: not swallowed

    with pytest.raises(ClientDisconnect):
        run(RequestContextMiddleware(disconnect_without_leaving, metrics), scope())
    assert count(metrics, "POST", "unmatched", "500") == 2
    assert metrics.registry.get_sample_value("sd3serve_requests_in_flight") == 0


def test_the_access_log_line_is_json_with_bounded_fields(caplog: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        scope["state"]["key_id"] = 7
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    long_path = "/" + "p" * 2000
    with caplog.at_level(logging.INFO, logger="sd3serve.access"):
        client = run(RequestContextMiddleware(app, Metrics()), scope("M" * 40, long_path))
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sd3serve.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "access" and line["request_id"] == client.headers["x-request-id"]
    assert line["status"] == 202 and line["key_id"] == 7 and line["client"] == "10.1.2.3"
    assert line["route"] == "unmatched"
    assert line["method"] == "M" * 32 + "...[8 more characters]"
    assert line["path"] == long_path[:1024] + f"...[{len(long_path) - 1024} more characters]"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0


def test_a_request_without_a_client_address_logs_a_dash(caplog: pytest.LogCaptureFixture) -> None:
    app, _ = answer()
    s = scope()
    s["client"] = None
    with caplog.at_level(logging.INFO, logger="sd3serve.access"):
        run(RequestContextMiddleware(app, Metrics()), s)
    line = json.loads(next(r.getMessage() for r in caplog.records if r.name == "sd3serve.access"))
    assert line["client"] == "-" and line["key_id"] is None


def test_other_scopes_pass_through_every_middleware_untouched() -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    lifespan = {"type": "lifespan"}
    for wrapped in (RequestContextMiddleware(app, Metrics()), HostMiddleware(app, None),
                    HostMiddleware(app, "https://sd.example.com"), HeadMiddleware(app),
                    RequestBodyMiddleware(app, max_bytes=1, timeout_s=1)):  # fmt: skip
        asyncio.run(wrapped(dict(lifespan), feed(), Client().send))
    assert seen == ["lifespan"] * 5


# --- HostMiddleware --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["localhost", "example.com:8080", "127.0.0.1", "[::1]:8000", "a_b.example", "x"])
def test_a_plain_host_passes(host: str) -> None:
    app, _ = answer()
    assert run(HostMiddleware(app, None), scope(headers={"host": host})).status == 200


@pytest.mark.parametrize("host", ["evil.com/path", "a@b", "host:port", "example.com:123456", "-lead", "x?y", ""])
def test_a_host_a_url_could_be_bent_with_is_400(host: str) -> None:
    app, seen = answer()
    client = run(HostMiddleware(app, None), scope(headers={"host": host}))
    assert client.status == 400 and seen == []
    assert client.headers["content-type"] == "application/json"
    assert "Host" in json.loads(client.body)["error"]
    assert int(client.headers["content-length"]) == len(client.body)


def test_no_host_header_passes() -> None:
    app, _ = answer()
    assert run(HostMiddleware(app, None), scope()).status == 200


def test_the_public_url_replaces_scheme_and_host() -> None:
    seen: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope["scheme"], scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    wrapped = HostMiddleware(app, "https://sd.example.com:8443/ignored")
    client = run(wrapped, scope(headers={"host": "evil.com/path", "x-other": "1"}))
    assert client.status == 200  # a bad Host does not matter: it is not used
    scheme, headers = seen[0]
    assert scheme == "https"
    assert [v for k, v in headers if k == b"host"] == [b"sd.example.com:8443"]
    assert (b"x-other", b"1") in headers


# --- HeadMiddleware --------------------------------------------------------------------------------------------


def test_head_is_get_without_the_body() -> None:
    methods: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        methods.append(scope["method"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"10")]})
        await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        await send({"type": "http.response.body", "body": b"56789"})

    s = scope("HEAD", "/healthz")
    client = run(HeadMiddleware(app), s)
    assert methods == ["GET"] and s["method"] == "HEAD"
    assert client.status == 200 and client.headers["content-length"] == "10"
    bodies = [m for m in client.sent if m["type"] == "http.response.body"]
    assert len(bodies) == 1 and bodies[0]["body"] == b"" and not bodies[0].get("more_body", False)


def test_other_methods_keep_their_body() -> None:
    app, _ = answer(content=b"hello")
    client = run(HeadMiddleware(app), scope("GET"))
    assert client.body == b"hello"


# --- RequestBodyMiddleware -------------------------------------------------------------------------------------

LIMIT = 100


def bounded(app: App, timeout_s: float = 30, larger: dict[str, int] | None = None) -> RequestBodyMiddleware:
    return RequestBodyMiddleware(app, max_bytes=LIMIT, timeout_s=timeout_s, larger=larger)


def test_a_declared_body_of_exactly_the_limit_is_read() -> None:
    app, seen = answer()
    client = run(bounded(app), scope(headers={"content-length": str(LIMIT)}), feed(body(b"x" * LIMIT)))
    assert client.status == 200 and seen == [b"x" * LIMIT]
    assert "connection" not in client.headers  # the body was read: the connection may be reused


def test_a_declared_body_one_byte_over_is_413_at_once_and_closes() -> None:
    app, seen = answer()
    client = run(bounded(app), scope(headers={"content-length": str(LIMIT + 1)}), feed(body(b"x" * (LIMIT + 1))))
    assert client.status == 413 and seen == []
    assert client.headers["connection"] == "close"
    assert str(LIMIT) in json.loads(client.body)["error"]


def test_a_route_with_a_larger_limit_has_its_own_edge() -> None:
    app, seen = answer()
    wrapped = bounded(app, larger={"/v1/images/edits": 300})
    ok = run(wrapped, scope(path="/v1/images/edits", headers={"content-length": "300"}), feed(body(b"y" * 300)))
    assert ok.status == 200 and seen == [b"y" * 300]
    over = run(wrapped, scope(path="/v1/images/edits", headers={"content-length": "301"}), feed(body(b"y" * 301)))
    assert over.status == 413
    other = run(wrapped, scope(headers={"content-length": "101"}), feed(body(b"y" * 101)))
    assert other.status == 413


def test_a_streamed_body_of_exactly_the_limit_is_read_and_one_byte_more_is_413() -> None:
    app, seen = answer()
    chunked = scope(headers={"transfer-encoding": "Chunked"})
    exact = run(bounded(app), chunked, feed(body(b"a" * 60, more=True), body(b"a" * 40)))
    assert exact.status == 200 and seen == [b"a" * LIMIT]

    app, seen = answer()
    over = run(bounded(app), scope(headers={"transfer-encoding": "chunked"}),
               feed(body(b"a" * 60, more=True), body(b"a" * 41, more=True), body(b"a")))  # fmt: skip
    assert over.status == 413 and seen == []
    assert over.headers["connection"] == "close"
    assert len([m for m in over.sent if m["type"] == "http.response.start"]) == 1


def test_an_undeclared_length_is_counted_as_it_arrives() -> None:
    app, seen = answer()
    client = run(bounded(app), scope(headers={"content-length": "10"}), feed(body(b"z" * (LIMIT + 1))))
    assert client.status == 413 and seen == []


def test_a_body_that_does_not_arrive_in_time_is_408() -> None:
    app, seen = answer()
    client = run(bounded(app, timeout_s=0.05), scope(headers={"content-length": "5"}),
                 feed(body(b"ab", more=True), then_wait=True))  # fmt: skip
    assert client.status == 408 and seen == []
    assert client.headers["connection"] == "close"
    assert "0.05 s" in json.loads(client.body)["error"]


def test_without_a_body_the_app_waits_for_a_disconnect_without_a_deadline() -> None:
    """A GET has no body: what the app receives next is the client leaving, however long that takes."""
    got: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        got.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def slow_disconnect() -> Message:
        await asyncio.sleep(0.2)
        return {"type": "http.disconnect"}

    client = run(bounded(app, timeout_s=0.01), scope("GET"), slow_disconnect)
    assert got == [{"type": "http.disconnect"}] and client.status == 200


def test_an_answer_before_the_body_was_read_closes_the_connection() -> None:
    app, _ = answer(status=401, read=False)
    client = run(bounded(app), scope(headers={"content-length": "50"}), feed(body(b"q" * 50)))
    assert client.status == 401 and client.headers["connection"] == "close"


def test_after_a_refusal_the_app_only_sees_the_client_gone_and_its_answer_is_dropped() -> None:
    seen: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(await receive())
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late"})

    client = run(bounded(app), scope(headers={"transfer-encoding": "chunked"}), feed(body(b"a" * 101, more=True)))
    assert seen == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]
    assert client.status == 413 and b"late" not in client.body


def test_the_app_leaving_after_a_refusal_is_not_an_error() -> None:
    app, _ = answer()  # raises ClientDisconnect on the disconnect it is given
    client = run(bounded(app), scope(headers={"transfer-encoding": "chunked"}), feed(body(b"a" * 101, more=True)))
    assert client.status == 413


def test_a_client_leaving_without_a_refusal_reaches_the_caller() -> None:
    app, _ = answer()
    with pytest.raises(ClientDisconnect):
        run(bounded(app), scope(headers={"content-length": "50"}), feed(body(b"a" * 10, more=True)))
