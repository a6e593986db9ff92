"""Progress events are the owner's: another key gets 404, with or without Last-Event-ID."""

from __future__ import annotations

import json
from pathlib import Path

from httpx_sse import connect_sse

from gated import paused_server
from helpers.two_keys import V2, h
from live_server import SMALL
from sd3serve.engine.loading import LoadedModel


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
