"""A live uvicorn server with the real app, for tests that go through HTTP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from helpers.ledger import Store, open_store
from sd3serve.api.app import create_app
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings

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
    store: Store
    settings: Settings

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def new_key(self, credits: float = 100) -> str:
        return self.store.create_key(credits=int(credits), name="test")[1]


@contextlib.contextmanager
def serving(
    settings: Settings, *, engine: Engine | None = None, options: dict[str, Any] | None = None, ready: bool = True
) -> Iterator[LiveServer]:
    """The real app under uvicorn on a free loopback port, in a thread, until the block ends; ``options``: uvicorn's
    (e.g. ``api.connections.uvicorn_options``, as ``sd3serve serve`` runs it); with ``ready``, once the model is
    ready (HTTP answers first and the model loads after)."""
    store = open_store(settings.resolved_database_url)
    app = create_app(settings, model_engine=engine, database=store.db)
    port = free_port()
    config = {"log_level": "warning", "lifespan": "on"} | (options or {}) | {"host": "127.0.0.1", "port": port}
    server = uvicorn.Server(uvicorn.Config(app, **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        ready_by = time.monotonic() + 600  # a liveness guard: the model may load slowly on a busy machine
        while ready and httpx.get(f"{url}/readyz", timeout=30).status_code != 200:
            if not thread.is_alive() or time.monotonic() > ready_by:
                raise RuntimeError("the test server's model did not become ready")
            time.sleep(0.05)
        yield LiveServer(url=url, app=app, store=store, settings=settings)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()


def run_live_server(settings: Settings, *, engine: Engine | None = None, ready: bool = True) -> Iterator[LiveServer]:
    """``serving`` as a generator, until it is closed."""
    with serving(settings, engine=engine, ready=ready) as server:
        yield server
