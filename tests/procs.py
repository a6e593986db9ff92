"""Real `sd3serve serve` processes and a TCP proxy that can cut a database off, for fault and load tests."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from helpers.same_code import same_code_env
from live_server import free_port


@dataclass
class ServerProcess:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def start_server(*, model_dir: Path, data_dir: Path, log_dir: Path, **settings: object) -> ServerProcess:
    port = free_port()
    env = {**same_code_env(), "HF_HUB_OFFLINE": "1", "SD3SERVE_DATA_DIR": str(data_dir), "SD3SERVE_PORT": str(port),
           "SD3SERVE_MODEL": str(model_dir), "SD3SERVE_DEVICE": "cpu", "SD3SERVE_LOG_LEVEL": "warning",
           "SD3SERVE_THREADS": "1"}  # fmt: skip  (several servers share 2 cores: one torch thread each)
    env |= {f"SD3SERVE_{k.upper()}": str(v) for k, v in settings.items()}
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3serve", "serve"], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600  # a liveness guard, not a timing: 4 servers loading at once on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return ServerProcess(proc, url, log)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become ready: {log.read_text()[-2000:]}")


class TcpProxy:
    """Forwards 127.0.0.1:port to a target; ``stop()`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._sockets.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                if self._listener is not listener:  # stopped while this connection was being set up
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
