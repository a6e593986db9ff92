"""The heartbeat does not share the fate of request handling: with the event loop blocked (a flood of streams or
downloads can starve it), the process still proves itself alive, and its peers do not presume it dead."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from helpers.ledger import sharing
from live_server import URL, LiveServer
from sd3serve.api.state import app_state
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.ledger.schema import Instance
from sd3serve.settings import Settings
from served import FLAT, connect, read_head, serve
from stub_engine import StubEngine
from waiting import wait_for

HEARTBEAT_S = 0.2


class LoopBlockingEngine(StubEngine):
    """Blocks the server's event loop itself (no await) from the first request until ``release`` is set."""

    def __init__(self) -> None:
        self.blocking = threading.Event()
        self.release = threading.Event()

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        self.blocking.set()
        self.release.wait(120)  # nothing else runs on the event loop meanwhile
        return await super().generate(job, request_id=request_id, progress=progress)


def heartbeat_at(server: LiveServer) -> datetime | None:
    instance_id = app_state(server.app).ledger.instance_id
    with Session(server.store.engine) as s:
        return s.scalar(select(Instance.heartbeat_at).where(Instance.id == instance_id))


def test_the_heartbeat_goes_on_while_the_event_loop_is_blocked(tmp_path: Path) -> None:
    engine = LoopBlockingEngine()
    settings = Settings(data_dir=tmp_path, device="cpu", heartbeat_s=HEARTBEAT_S, shutdown_grace_s=5)
    with serve(settings, engine) as server:
        key = server.new_key(5)
        body = json.dumps(FLAT).encode()
        with connect(server, timeout=60) as sock:
            sock.sendall(f"POST {URL} HTTP/1.1\r\nhost: t\r\nx-api-key: {key}\r\ncontent-type: application/json\r\n"
                         f"content-length: {len(body)}\r\n\r\n".encode() + body)  # fmt: skip
            try:
                assert engine.blocking.wait(60)
                beats = [heartbeat_at(server)]
                for _ in range(4):  # 4 beats while blocked: longer than the 3 after which peers presume it dead
                    beats.append(wait_for(lambda: (b := heartbeat_at(server)) is not None and b > beats[-1] and b, 20))
                assert not engine.release.is_set() and engine.blocking.is_set()  # still blocked all along
                peer = sharing(server.store)
                assert peer.settle_dead(dead_after=timedelta(seconds=3 * HEARTBEAT_S)) == 0
                assert heartbeat_at(server) is not None  # still registered, its holds untouched
            finally:
                engine.release.set()
            status, _, _ = read_head(sock)
            assert status == 200  # the request it was blocked in completes and is delivered
