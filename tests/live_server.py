"""A live uvicorn server with the real app, for tests that go through HTTP."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import uvicorn
from fastapi import FastAPI

from sd3serve.api.app import create_app
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore

URL = "/v1/stable-diffusion-3.5-turbo-txt2img"
SMALL: dict[str, object] = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    app: FastAPI
    store: CreditStore
    settings: Settings

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def new_key(self, credits: float = 100) -> str:
        return self.store.create_key(credits=int(credits), name="test")[1]


def run_live_server(settings: Settings, *, engine: Engine | None = None, ready: bool = True) -> Iterator[LiveServer]:
    """uvicorn on a free port in a thread, with the real app, until the generator is closed; with ``ready``, once
    the model is ready."""
    store = CreditStore(settings.resolved_database_url)
    app = create_app(settings, engine=engine, store=store)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    # HTTP answers first and the model loads after (api/app.py): wait until it is ready.
    while ready and httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code != 200:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server's model did not become ready")
        time.sleep(0.05)
    try:
        yield LiveServer(url=f"http://127.0.0.1:{port}", app=app, store=store, settings=settings)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()
