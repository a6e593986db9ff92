"""Live progress as Server-Sent Events, read with a real SSE client (httpx-sse)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import connect_sse

from gated import paused_server
from live_server import SMALL
from sd3serve.engine.loading import LoadedModel

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


def events(c: httpx.Client, key: str, task_id: str, **headers: str) -> Any:
    return connect_sse(c, "GET", f"/v2/requests/{task_id}/events", headers={"x-api-key": key, **headers})


def test_progress_then_result_and_resume(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=2) as (server, engine):
        key = server.new_key(5)
        with server.client() as c:
            task_id = c.post(SUBMIT, json={**SMALL, "steps": 4}, headers={"x-api-key": key}).json()["request_id"]
            assert engine.paused.wait(60)
            seen: list[tuple[str, str, dict[str, Any]]] = []
            with events(c, key, task_id) as source:
                assert source.response.headers["content-type"].startswith("text/event-stream")
                for sse in source.iter_sse():
                    seen.append((sse.id, sse.event, json.loads(sse.data)))
                    if sse.event == "progress" and json.loads(sse.data)["step"] == 2:
                        engine.gate.set()  # the rest of the run, while we listen
            names = [name for _, name, _ in seen]
            assert names[-1] == "completed" and set(names[:-1]) <= {"queued", "progress"}
            steps = [d["step"] for _, name, d in seen if name == "progress"]
            assert steps == sorted(steps) and 2 in steps and all(d["steps"] == 4 for _, n, d in seen if n == "progress")
            ids = [int(i) for i, _, _ in seen]
            assert ids == sorted(ids) and ids[-1] == 1000
            result = seen[-1][2]
            assert result["status"] == "COMPLETED" and result["output"][0].endswith(f"/v2/requests/{task_id}/images/0")

            # Reconnecting after the end with the last id seen: nothing more, the stream closes.
            with events(c, key, task_id, **{"Last-Event-ID": "1000"}) as source:
                assert list(source.iter_sse()) == []
            # Resuming from step 2: only what came after it.
            with events(c, key, task_id, **{"Last-Event-ID": "3"}) as source:
                assert [s.event for s in source.iter_sse()] == ["completed"]
            other = server.new_key(1)
            assert c.get(f"/v2/requests/{task_id}/events", headers={"x-api-key": other}).status_code == 404


def test_a_cancelled_task_ends_its_stream(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        key = server.new_key(5)
        h = {"x-api-key": key}
        with server.client() as c:
            c.post(SUBMIT, json={**SMALL, "steps": 4}, headers=h)
            assert engine.paused.wait(60)
            queued = c.post(SUBMIT, json={**SMALL, "steps": 3}, headers=h).json()["request_id"]
            with events(c, key, queued) as source:
                it = source.iter_sse()
                first = next(it)
                assert (first.event, json.loads(first.data)) == ("queued", {"position": 0})
                c.post(f"/v2/requests/{queued}/cancel", headers=h)
                last = next(it)
                assert last.event == "cancelled" and "nothing was charged" in json.loads(last.data)["error"]
                assert list(it) == []
