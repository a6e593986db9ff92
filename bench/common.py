"""What the benchmarks share: a server process on a free port, and a key with credits to spare."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore

URL = "/v1/stable-diffusion-3.5-turbo-txt2img"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.args}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    sys.exit(f"server not ready: {proc.args}")


def rich_key(data_dir: Path) -> str:
    """A key with more credits than any benchmark spends, in the data dir's SQLite store."""
    store = CreditStore(Settings(data_dir=data_dir).resolved_database_url)
    store.create_schema()
    key = store.create_key(credits=10**9, name="bench")[1]
    store.close()
    return key


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def sd3serve(data_dir: Path, model: Path | None = None, **settings: object) -> Iterator[Server]:
    """`sd3serve serve` in its own process, on the CPU, on a free port."""
    port = free_port()
    env = {**os.environ, "SD3SERVE_DATA_DIR": str(data_dir), "SD3SERVE_PORT": str(port), "SD3SERVE_DEVICE": "cpu",
           "SD3SERVE_LOG_LEVEL": "warning"}  # fmt: skip
    env |= {f"SD3SERVE_{k.upper()}": str(v) for k, v in settings.items()}
    if model is not None:
        env["SD3SERVE_MODEL"] = str(model)
    proc = subprocess.Popen([sys.executable, "-m", "sd3serve", "serve"], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        yield Server(url=url, pid=proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
