"""One key floods the server with what it can hold open (event streams far past its limit, base64 downloads it never
reads, webhooks to receivers that hang or trickle) while another key uses the API: generation (v1 and v2 with its
event stream and its webhook), polls, base64 results and /healthz all succeed, and the model's progress reaches the
victim's stream. The victim's round is timed with and without the flood, side by side, and the ratio printed; the
assertions are outcomes and generous deadlines only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from helpers.webhook_receiver import Receiver
from live_server import URL
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings
from served import LARGE_BASE64, connect, held_streams, read_head, send_get, serve, submit, wait_status
from waiting import wait_for

PER_KEY = 8
HOOKS_PER_KEY = 4  # webhook attempts in flight per key
DEADLINE_S = 60  # each of the victim's requests (a client timeout, not a measurement)
SMALL = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 2}


class FloodEngine(BatchingEngine):
    """The real engine and model, except for the attacker's tasks: "noise" is answered with large random images at
    once, and "hold" reports step 1 and then runs (without the model) until ``release`` is set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = threading.Event()

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        size = (job.width, job.height)
        if job.prompt == "noise":
            return GenerationResult(images=[Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
                                            for _ in range(job.batch_size)])  # fmt: skip
        if job.prompt == "hold":
            if progress is not None:
                progress(1, job.steps)
            await asyncio.get_running_loop().run_in_executor(None, self.release.wait, 120)
            return GenerationResult(images=[Image.new("RGB", size) for _ in range(job.batch_size)])
        return await super().generate(job, request_id=request_id, progress=progress)


def victim_round(c: httpx.Client, key: str, hook: Receiver) -> float:
    """Everything the other key does, each must succeed; returns the seconds the round took."""
    h = {"x-api-key": key}
    start = time.perf_counter()
    delivered = hook.hits("/ok")
    assert c.get("/healthz").status_code == 200
    assert c.post(URL, json=SMALL, headers=h).status_code == 200  # v1: the model runs while the client waits
    task_id = submit(c, key, {**SMALL, "base64": True, "steps": 3, "webhook_url": hook.url("/ok")})
    with c.stream("GET", f"/v2/requests/{task_id}/events", headers=h) as events:  # the victim's own stream
        assert events.status_code == 200
        names = [line.removeprefix("event: ") for line in events.iter_lines() if line.startswith("event:")]
    assert names[-1] == "completed" and set(names[:-1]) <= {"queued", "progress"}, names
    assert c.get(f"/v2/requests/{task_id}/status", headers=h).json()["status"] == "COMPLETED"
    result = c.get(f"/v2/requests/{task_id}", headers=h)  # a base64 result, while the attacker's stall
    assert result.status_code == 200 and len(result.json()["output"]) == 1
    wait_for(lambda: hook.hits("/ok") == delivered + 1, DEADLINE_S)  # the victim's webhook, sent at completion
    return time.perf_counter() - start


def test_a_flood_from_one_key_leaves_another_key_served(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0, shutdown_grace_s=5,
                        max_streams_per_key=PER_KEY, max_connections=200, webhook_allow_private=True,
                        webhook_timeout_s=DEADLINE_S * 3, webhook_per_key=HOOKS_PER_KEY)  # fmt: skip
    engine = FloodEngine(settings, model=tiny_model)
    with (
        serve(settings, engine) as server,
        httpx.Client(base_url=server.url, timeout=DEADLINE_S) as c,
        contextlib.ExitStack() as flood,
    ):
        slow, hook = Receiver(), Receiver()  # the attacker's receivers (hang, trickle) and the victim's
        flood.callback(slow.close)
        attacker, victim = server.new_key(1000), server.new_key(1000)
        for key in (attacker, victim):
            assert c.post("/v1/webhook-secret", headers={"x-api-key": key}).status_code == 200
        try:
            baseline = [victim_round(c, victim, hook) for _ in range(2)]

            # The flood: downloads of a large base64 result that are never read, then event streams far past the
            # key's limit (each refused one is a 429 at once), on tasks that stay running.
            large = submit(c, attacker, LARGE_BASE64)
            held = [submit(c, attacker, {**SMALL, "prompt": "hold"}) for _ in range(2)]
            wait_status(c, attacker, large, "COMPLETED")
            for _ in range(PER_KEY // 2):
                sock = flood.enter_context(connect(server, receive_buffer=4096, timeout=DEADLINE_S))
                send_get(sock, f"/v2/requests/{large}", attacker)
                assert read_head(sock)[0] == 200
            statuses = []
            for i in range(40):
                r = flood.enter_context(c.stream("GET", f"/v2/requests/{held[i % 2]}/events",
                                                 headers={"x-api-key": attacker}))  # fmt: skip
                statuses.append(r.status_code)
                if r.status_code != 200:
                    r.read()
                    assert "SD3SERVE_MAX_STREAMS_PER_KEY" in json.loads(r.content)["error"]
            assert statuses.count(200) == PER_KEY // 2 and statuses.count(429) == 40 - PER_KEY // 2
            assert held_streams(server, attacker) == PER_KEY

            # Webhooks to receivers that never answer or trickle a byte at a time: twice the key's sending slots.
            hooked = [submit(c, attacker, {**SMALL, "prompt": "noise", "webhook_url": slow.url(path)})
                      for path in ["/hang", "/trickle"] * HOOKS_PER_KEY]  # fmt: skip
            for task_id in hooked:
                wait_status(c, attacker, task_id, "COMPLETED")
            slow_host = f"127.0.0.1:{slow.port}"
            wait_for(lambda: slow.active[slow_host] == HOOKS_PER_KEY, DEADLINE_S)

            flooded = [victim_round(c, victim, hook) for _ in range(2)]
            assert held_streams(server, attacker) == PER_KEY  # the flood stood through every flooded round
            assert slow.active[slow_host] == slow.most_active[slow_host] == HOOKS_PER_KEY  # and so did its hooks
            assert slow.statuses == []  # none of the attacker's deliveries was answered
            flood.close()
            baseline.append(victim_round(c, victim, hook))  # and once more alone, after it
        finally:
            engine.release.set()
            hook.close()
        ratio = min(flooded) / min(baseline)
        print(
            f"victim round (s): alone {[round(t, 2) for t in baseline]}, flooded {[round(t, 2) for t in flooded]}; "
            f"ratio of the best {ratio:.2f}"
        )
