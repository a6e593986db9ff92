"""A local webhook receiver whose behaviour is chosen by the path of the URL it is sent to: /ok (204), /fail (500),
/fail-first/N (500 the first N times on that path, then 204), /hang (no answer until closed), /trickle (a status
line, then one byte every 0.2 s until closed). It records every request and how many it answers at once per Host."""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple


class Hit(NamedTuple):
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes


class Receiver:
    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[Hit] = []
        self.statuses: list[int] = []  # the answers given, in order (hanging and trickling ones never count)
        self.active: Counter[str] = Counter()  # requests being answered, by Host header
        self.most_active: Counter[str] = Counter()
        self.released = threading.Event()
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                host = self.headers.get("host", "")
                with receiver.lock:
                    receiver.requests.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    seen = receiver.hits(self.path)
                    receiver.active[host] += 1
                    receiver.most_active[host] = max(receiver.most_active[host], receiver.active[host])
                try:
                    self._answer(seen)
                except OSError:
                    pass  # the sender gave up on us
                finally:
                    with receiver.lock:
                        receiver.active[host] -= 1

            def _answer(self, seen: int) -> None:
                if self.path == "/hang":
                    receiver.released.wait()
                if self.path == "/trickle":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nx-slow: ")
                    while not receiver.released.wait(0.2):
                        self.wfile.write(b"a")
                        self.wfile.flush()
                    return
                status = 204
                if self.path == "/fail" or (self.path.startswith("/fail-first/") and seen <= int(self.path[12:])):
                    status = 500
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()
                with receiver.lock:
                    receiver.statuses.append(status)

            def log_message(self, *args: Any) -> None: ...

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        return sum(1 for hit in self.requests if hit.path == path)

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
