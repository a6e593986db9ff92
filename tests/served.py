"""The app under uvicorn with the options of `sd3serve serve` (connection cap, timeouts), and test engines for
what clients can hold open: requests that stay running, and results large enough to fill a socket's buffers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
from typing import Any

import httpx
from PIL import Image

from live_server import LiveServer, serving
from sd3serve.api.connections import uvicorn_options
from sd3serve.api.state import app_state
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

V2 = "/v2/stable-diffusion-3.5-turbo-txt2img"
FLAT = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2}
# 4 incompressible 1024² PNGs: ~12 MB stored, ~16 MB of base64, more than the kernel buffers of one connection.
LARGE_BASE64 = {"prompt": "noise", "width": 1024, "height": 1024, "steps": 2, "batch_size": 4, "image_format": "png",
                "base64": True}  # fmt: skip


class HoldingEngine(StubEngine):
    """The stub engine, but each request reports step 1 and then runs until ``release`` is set."""

    def __init__(self) -> None:
        self.release = threading.Event()

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        if progress is not None:
            progress(1, job.steps)
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 120)
        return await super().generate(job, request_id=request_id, progress=progress)


class NoiseEngine(StubEngine):
    """The stub engine with images of random noise: PNGs as large as their pixels."""

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        size = (job.width, job.height)
        return GenerationResult(images=[Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
                                        for _ in range(job.batch_size)])  # fmt: skip


def serve(settings: Settings, engine: Engine) -> contextlib.AbstractContextManager[LiveServer]:
    """The app under uvicorn on a free loopback port, with ``sd3serve serve``'s options, until the block ends."""
    return serving(settings, engine=engine, options=uvicorn_options(settings))


def key_id(server: LiveServer, api_key: str) -> int:
    return server.store.authenticate(api_key=api_key).id


def held_streams(server: LiveServer, api_key: str | None = None) -> int:
    """Open streams (event streams, base64 downloads) the server counts for this key, or for everyone."""
    hub = app_state(server.app).streams
    return hub.held(None if api_key is None else key_id(server, api_key))


def submit(c: httpx.Client, api_key: str, body: dict[str, Any]) -> str:
    r = c.post(V2, json=body, headers={"x-api-key": api_key})
    assert r.status_code == 200, r.text
    task_id: str = r.json()["request_id"]
    return task_id


def wait_status(c: httpx.Client, api_key: str, task_id: str, status: str, timeout: float = 90) -> None:
    def reached() -> bool:
        r = c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": api_key})
        return bool(r.json()["status"] == status)

    wait_for(reached, timeout)


def connect(server: LiveServer, *, receive_buffer: int | None = None, timeout: float = 30) -> socket.socket:
    """A raw connection; with ``receive_buffer``, a small kernel receive buffer (a reader that takes little)."""
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def send_get(sock: socket.socket, path: str, api_key: str) -> None:
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: t\r\nx-api-key: {api_key}\r\n\r\n".encode())


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status line and headers of a response (and whatever of its body came with them), reading no more."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1024)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, rest


def error_of(r: httpx.Response) -> str:
    message: str = json.loads(r.read())["error"]
    return message
