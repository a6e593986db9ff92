"""Progress events and their previews are the owner's: another key gets 404, with or without Last-Event-ID."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from httpx_sse import connect_sse

from gated import paused_server
from helpers.two_keys import V2, h
from live_server import SMALL
from sd3serve.engine.loading import LoadedModel
from waiting import wait_for


def test_another_key_cannot_follow_or_resume_a_stream(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=2) as (server, engine):
        a, b = server.new_key(3), server.new_key(3)
        with server.client() as c:
            task = c.post(V2, json={**SMALL, "steps": 4}, headers=h(a)).json()["request_id"]
            assert engine.paused.wait(60)
            for resume in ({}, {"Last-Event-ID": "2"}, {"Last-Event-ID": "1000"}):
                r = c.get(f"/v2/requests/{task}/events", headers=h(b, **resume))
                assert r.status_code == 404, resume
            # Resuming in the middle of the run, as its owner: nothing at or before the id sent.
            with connect_sse(c, "GET", f"/v2/requests/{task}/events", headers=h(a, **{"Last-Event-ID": "2"})) as s:
                it = s.iter_sse()
                first = next(it)
                assert (first.event, int(first.id), json.loads(first.data)["step"]) == ("progress", 3, 2)
                engine.gate.set()
                rest = [(int(e.id), e.event) for e in it]
            assert rest[-1] == (1000, "completed") and all(i > 3 for i, _ in rest)
            assert [i for i, _ in rest] == sorted(i for i, _ in rest)


def test_previews_are_the_owners_only(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """Another key's preview stream is a 404 that watches nothing; each key's previews are of its own task."""
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        a, b = server.new_key(3), server.new_key(3)
        service = server.app.state.sd3.service
        with server.client() as c:
            task_a = c.post(V2, json={**SMALL, "steps": 4, "seed": 1}, headers=h(a)).json()["request_id"]
            assert engine.paused.wait(60)
            body_b = {**SMALL, "steps": 4, "seed": 2, "prompt": "a green square"}
            task_b = c.post(V2, json=body_b, headers=h(b)).json()["request_id"]
            for resume in ({}, {"Last-Event-ID": "2"}):
                r = c.get(f"/v2/requests/{task_a}/events?preview=true", headers=h(b, **resume))
                assert r.status_code == 404, resume
            assert not service.previews.watched(task_a)

            pictures: dict[str, list[str]] = {}

            def follow(key: str, task: str) -> None:
                url = f"/v2/requests/{task}/events?preview=true"
                with server.client() as c2, connect_sse(c2, "GET", url, headers=h(key)) as s:
                    pictures[key] = [d["preview"]["image"] for e in s.iter_sse()
                                     if e.event == "progress" and "preview" in (d := json.loads(e.data))]  # fmt: skip

            readers = [threading.Thread(target=follow, args=args) for args in ((a, task_a), (b, task_b))]
            for t in readers:
                t.start()
            wait_for(lambda: service.previews.watched(task_a) and service.previews.watched(task_b))
            engine.gate.set()
            for t in readers:
                t.join(120)
        assert pictures[a] and pictures[b]
        assert not set(pictures[a]) & set(pictures[b])
