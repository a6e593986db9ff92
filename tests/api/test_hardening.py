"""What a hostile client can do to a running server (issue 15): bodies, path numbers, methods, slow clients,
abandoned uploads, forged headers, metric labels, credit amounts. Against uvicorn run as `sd3serve serve` runs it."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from live_server import URL, LiveServer, serving
from sd3serve.api.connections import uvicorn_options
from sd3serve.settings import Settings
from served import read_head
from stub_engine import StubEngine

ADMIN_KEY = "adm-" + "Kq8ZpR3vT6wYb1NcF5hJ9mXs2LdG7uEa"
ADMIN = {"x-admin-key": ADMIN_KEY}
V2 = "/v2/stable-diffusion-3.5-turbo-txt2img"
HUGE = "9999999999999999999999"


def serve(tmp_path: Path, **overrides: Any) -> contextlib.AbstractContextManager[LiveServer]:
    """The app under uvicorn with the options of `sd3serve serve` (cli.cmd_serve), on a free port."""
    settings = Settings(data_dir=tmp_path, device="cpu", **overrides)
    return serving(settings, engine=StubEngine(), options=uvicorn_options(settings), ready=False)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    with serve(tmp_path, admin_key=ADMIN_KEY) as s:
        yield s


def connect(server: LiveServer, timeout: float = 20) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response from a raw socket (status, lower-cased headers, body)."""
    status, headers, body = read_head(sock)
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return status, headers, body


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closes the connection before the socket's timeout (reading any leftover bytes)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def metric(server: LiveServer, name: str, **labels: str) -> float:
    """The value of the series of ``name`` with these labels; 0 for one that never happened."""
    with server.client() as c:
        text = c.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def access_lines(caplog: pytest.LogCaptureFixture, route: str) -> list[dict[str, Any]]:
    """The access log lines of ``route``, once there are some (a line is written just after its response)."""
    deadline = time.monotonic() + 20
    while True:
        lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sd3serve.access"]
        if found := [line for line in lines if line["route"] == route]:
            return found
        assert time.monotonic() < deadline
        time.sleep(0.02)


# 1. Bodies are bounded before they are read, and credentials come before the body.


@pytest.mark.parametrize("path", ["/admin/keys", "/admin/keys/1/credits", URL, V2, "/healthz", "/no/such/path"])
def test_a_declared_body_over_the_limit_is_413_at_once(server: LiveServer, path: str) -> None:
    with connect(server) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nhost: t\r\ncontent-length: 300000000\r\n\r\n".encode() + b"{" * 1000)
        status, headers, body = read_response(sock)  # answered with 299 999 000 bytes still to come
        assert status == 413 and "300000000" in json.loads(body)["error"]
        assert headers["connection"] == "close" and closed_by_server(sock)


def test_a_declared_body_over_the_limit_is_413_with_the_admin_api_off(tmp_path: Path) -> None:
    with serve(tmp_path) as server, connect(server) as sock:
        sock.sendall(b"POST /admin/keys HTTP/1.1\r\nhost: t\r\ncontent-length: 200000000\r\n\r\n")
        assert read_response(sock)[0] == 413


def test_a_streamed_body_is_cut_at_the_limit(server: LiveServer) -> None:
    key = server.new_key(5)

    def chunks(n: int) -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(n):
            yield b"x" * 1024

    with server.client() as c:
        for path, headers in ((URL, {"x-api-key": key}), ("/admin/keys", ADMIN)):
            r = c.post(path, content=chunks(100), headers=headers)  # chunked, no length: 100 KiB > 64 KiB
            assert r.status_code == 413 and "too large" in r.json()["error"], (path, r.text)
        r = c.post("/healthz", content=chunks(100))  # answered from the headers: the body is never read
        assert r.status_code == 405 and r.headers["connection"] == "close"
        r = c.post("/admin/keys", content=chunks(5), headers=ADMIN)  # the admin routes take 4 KiB
        assert r.status_code == 413
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 5}


@pytest.mark.parametrize(("admin_key", "status"), [(ADMIN_KEY, 403), (None, 404)])
def test_the_admin_key_is_checked_before_the_body_is_read(tmp_path: Path, admin_key: str | None, status: int) -> None:
    """An anonymous body is never read, let alone parsed: the answer comes while most of it is still unsent."""
    with serve(tmp_path, admin_key=admin_key) as server:
        with connect(server) as sock:
            sock.sendall(b"POST /admin/keys HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n")
            sock.sendall(b"%x\r\n%s\r\n" % (60000, b"[" * 60000))  # 1 MB announced in chunks, 60 KB sent
            code, headers, _ = read_response(sock)
            assert code == status and headers["connection"] == "close" and closed_by_server(sock)
        with server.client() as c:
            r = c.post("/admin/keys", content=b"[" * 60000, headers={"content-type": "application/json"})
            assert r.status_code == status  # not 400: not parsed
            r = c.post("/admin/keys/1/credits", content=b"not json", headers={"x-admin-key": "wrong" * 8})
            assert r.status_code == status


def test_admin_bodies_are_validated_after_the_key(server: LiveServer) -> None:
    with server.client() as c:
        for body in (b"[", b"", b"[1]", b'{"credits": NaN}', b'{"credits": "x"}', b'{"name": "no credits"}'):
            r = c.post("/admin/keys", content=body, headers=ADMIN)
            assert r.status_code == 400 and r.json()["error"], (body, r.text)
        r = c.post("/admin/keys", json={"credits": 3, "name": "ok"}, headers=ADMIN)
        assert r.status_code == 200 and r.json()["credits"] == 3


def test_admin_request_bodies_are_documented(server: LiveServer) -> None:
    with server.client() as c:
        paths = c.get("/openapi.json").json()["paths"]
    for path in ("/admin/keys", "/admin/keys/{key_id}/credits"):
        schema = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert "credits" in schema["properties"] and schema["required"] == ["credits"]


# 3. Integers in paths are bounded like integers in bodies.


def test_path_integers_beyond_64_bits_are_400(server: LiveServer) -> None:
    with server.client() as c:
        for path in (f"/admin/keys/{HUGE}/revoke", f"/admin/keys/{HUGE}/credits", "/admin/keys/0/revoke"):
            r = c.post(path, json={"credits": 1}, headers=ADMIN)
            assert r.status_code == 400 and "key_id" in r.json()["error"], (path, r.text)


def test_image_index_beyond_64_bits_is_400(server: LiveServer) -> None:
    key = server.new_key(5)
    with server.client() as c:
        task = c.post(V2, json={"prompt": "a red circle", "width": 64, "height": 64}, headers={"x-api-key": key})
        task_id = task.json()["request_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()["status"] != "COMPLETED":
            assert time.monotonic() < deadline
            time.sleep(0.02)  # a client polls; so does this test
        assert c.get(f"/v2/requests/{task_id}/images/0", headers={"x-api-key": key}).status_code == 200
        r = c.get(f"/v2/requests/{task_id}/images/{HUGE}", headers={"x-api-key": key})
        assert r.status_code == 400 and "index" in r.json()["error"], r.text


# 4. 405 names the methods there are; HEAD is answered wherever GET is.


def _example(path: str) -> str:
    return path.replace("{key_id}", "1").replace("{task_id}", "no-such-task").replace("{index}", "0")


def test_405_allow_and_head_on_every_route(server: LiveServer) -> None:
    key = server.new_key(5)
    headers = {"x-api-key": key, **ADMIN}
    with server.client() as c:
        paths: dict[str, dict[str, Any]] = c.get("/openapi.json").json()["paths"]
        assert len(paths) >= 10
        for template, operations in paths.items():
            path, methods = _example(template), {m.upper() for m in operations}
            expected = methods | ({"HEAD"} if "GET" in methods else set())
            for wrong in {"DELETE", "PUT", "PATCH", "POST"} - methods:
                r = c.request(wrong, path, headers=headers)
                assert r.status_code == 405, (wrong, path, r.status_code)
                assert set(r.headers["allow"].split(", ")) == expected, (wrong, path, r.headers["allow"])
            if "GET" in methods:
                got, head = c.get(path, headers=headers), c.head(path, headers=headers)
                assert head.status_code == got.status_code and head.content == b"", (path, head.status_code)
                assert head.headers["content-type"] == got.headers["content-type"]
            else:
                assert c.head(path, headers=headers).status_code == 405
        assert c.delete("/no/such/path").status_code == 404


# 5. Slow clients are dropped; the server keeps answering.


@pytest.fixture
def impatient(tmp_path: Path) -> Iterator[LiveServer]:
    with serve(tmp_path, header_timeout_s=1, body_timeout_s=1, keep_alive_s=1) as s:
        yield s


def test_a_body_that_never_comes_is_408(impatient: LiveServer) -> None:
    key = impatient.new_key(5)
    with connect(impatient, timeout=15) as sock:
        sock.sendall(f"POST {URL} HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\ncontent-length: 100\r\n\r\n".encode())
        with impatient.client(timeout=5) as c:  # meanwhile the server answers others
            assert c.get("/healthz").status_code == 200
        start = time.monotonic()
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close" and "did not arrive" in json.loads(body)["error"]
        assert closed_by_server(sock) and time.monotonic() - start < 10  # not hung: 1 s timeout + slack
    assert metric(impatient, "sd3serve_requests_total", route=URL, status="408") == 1


@pytest.mark.parametrize(
    "prefix", [b"", b"GET /healthz HTTP/1.1\r\nhost: t\r\n", b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\nGET /hea"]
)
def test_headers_that_never_end_close_the_connection(impatient: LiveServer, prefix: bytes) -> None:
    """A connection sending nothing, half its headers, or half the headers of its second request."""
    with connect(impatient, timeout=15) as sock:
        sock.sendall(prefix)
        with impatient.client(timeout=5) as c:
            assert c.get("/healthz").status_code == 200
        start = time.monotonic()
        assert closed_by_server(sock) and time.monotonic() - start < 10  # not hung: 1 s timeout + slack


def test_connections_past_the_cap_get_503(tmp_path: Path) -> None:
    with serve(tmp_path, max_connections=4) as server:
        idle = [connect(server) for _ in range(4)]
        try:
            with server.client(timeout=5) as c:
                deadline = time.monotonic() + 10
                while (status := c.get("/healthz").status_code) != 503:  # once the server has taken them all in
                    assert status == 200 and time.monotonic() < deadline
        finally:
            for sock in idle:
                sock.close()
        with server.client(timeout=5) as c:
            deadline = time.monotonic() + 10
            while c.get("/healthz").status_code != 200:
                assert time.monotonic() < deadline


def test_serve_passes_the_connection_settings_to_uvicorn(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from sd3serve import cli

    seen: dict[str, Any] = {}
    assert uvicorn_options(Settings())["proxy_headers"] is False  # nobody's X-Forwarded-* by default
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    monkeypatch.setenv("SD3SERVE_FORWARDED_ALLOW_IPS", "10.0.0.1")
    monkeypatch.setenv("SD3SERVE_MAX_CONNECTIONS", "77")
    monkeypatch.setenv("SD3SERVE_HEADER_TIMEOUT_S", "3")
    assert cli.main(["serve", "--data-dir", str(tmp_path), "--port", "1234"]) == 0
    assert seen["port"] == 1234 and seen["limit_concurrency"] == 77 and seen["http"].header_timeout_s == 3
    assert seen["proxy_headers"] is True and seen["forwarded_allow_ips"] == "10.0.0.1"


# 6. An abandoned upload is a client abort, not a server error.


def test_abandoned_upload_is_499(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    key = server.new_key(5)
    caplog.set_level(logging.INFO, logger="sd3serve.access")
    with connect(server) as sock:
        sock.sendall(f"POST {URL} HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\ncontent-length: 5000\r\n\r\n".encode())
        sock.sendall(b'{"prompt": "x')
    deadline = time.monotonic() + 20
    while metric(server, "sd3serve_requests_total", route=URL, status="499") != 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert metric(server, "sd3serve_requests_total", route=URL, status="500") == 0
    assert [line["status"] for line in access_lines(caplog, URL)] == [499]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]  # no traceback either
    with server.client() as c:
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 5}


# 7. Forwarded headers only from trusted proxies; absolute URLs from the public URL.


def _v2_poll_url(server: LiveServer, headers: dict[str, str]) -> str:
    with server.client() as c:
        body = {"prompt": "x", "width": 64, "height": 64}
        r = c.post(V2, json=body, headers={"x-api-key": server.new_key(1), **headers})
        assert r.status_code == 200, r.text
        return str(r.json()["poll_url"])


FORGED = {"x-forwarded-for": "6.6.6.6", "x-forwarded-proto": "https", "x-forwarded-host": "evil.example"}


def test_forwarded_headers_are_ignored_by_default(server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sd3serve.access")
    assert _v2_poll_url(server, FORGED).startswith(server.url + "/v2/requests/")
    assert [line["client"] for line in access_lines(caplog, V2)] == ["127.0.0.1"]
    with server.client() as c:
        for host in ("evil.example/x?", "a@b", "x y"):
            r = c.get("/healthz", headers={"host": host})
            assert r.status_code == 400 and "Host" in r.json()["error"]


def test_forwarded_headers_from_a_trusted_proxy(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sd3serve.access")
    with serve(tmp_path, forwarded_allow_ips="127.0.0.1") as server:
        assert _v2_poll_url(server, FORGED).startswith("https://")
    clients = {json.loads(r.getMessage())["client"] for r in caplog.records if r.name == "sd3serve.access"}
    assert clients == {"6.6.6.6"}


def test_absolute_urls_come_from_the_public_url(tmp_path: Path) -> None:
    with serve(tmp_path, public_url="https://images.example.com") as server:
        poll = _v2_poll_url(server, {"host": "evil.example", **FORGED})
        assert poll.startswith("https://images.example.com/v2/requests/")
        with server.client() as c:
            r = c.get("/healthz/", headers={"host": "evil.example"})  # the trailing-slash redirect
            assert r.status_code == 307 and r.headers["location"] == "https://images.example.com/healthz"


# 8. Credit amounts are bounded and exact.


def test_admin_amounts_are_bounded_and_exact(server: LiveServer) -> None:
    with server.client() as c:
        for credits in (1e10, 1e-7, "0.0000001", -1, "1e999"):
            r = c.post("/admin/keys", json={"credits": credits}, headers=ADMIN)
            assert r.status_code == 400 and "credits" in r.json()["error"], (credits, r.text)
        key_id = c.post("/admin/keys", json={"credits": 1e9}, headers=ADMIN).json()["id"]
        for credits in (1e9 + 1, 1e-7, 0):
            r = c.post(f"/admin/keys/{key_id}/credits", json={"credits": credits}, headers=ADMIN)
            assert r.status_code == 400 and "credits" in r.json()["error"], (credits, r.text)
        assert c.post(f"/admin/keys/{key_id}/credits", json={"credits": 0.000001}, headers=ADMIN).status_code == 200
        rich, _ = server.store.create_key(credits=Decimal(9 * 10**12) - 1)
        r = c.post(f"/admin/keys/{rich.id}/credits", json={"credits": 2}, headers=ADMIN)
        assert r.status_code == 400 and "exceed" in r.json()["error"]
        assert c.post(f"/admin/keys/{rich.id}/credits", json={"credits": 1}, headers=ADMIN).status_code == 200


# 11. Metric labels and log lines stay bounded whatever the client sends.


def test_unknown_methods_share_one_label_and_log_lines_are_bounded(
    server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sd3serve.access")
    with server.client() as c:
        for i in range(5):
            assert c.request(f"X{i}" + "M" * 5000, "/healthz").status_code == 405
        assert c.get("/" + "p" * 8000).status_code == 404
        text = c.get("/metrics").text
    assert "MMMM" not in text
    assert metric(server, "sd3serve_requests_total", method="other", route="/healthz", status="405") == 5
    lines = [json.dumps(line) for line in access_lines(caplog, "unmatched") + access_lines(caplog, "/healthz")]
    assert max(len(line) for line in lines) < 2000 and any("more characters]" in line for line in lines)
