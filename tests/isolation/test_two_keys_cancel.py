"""Cancelling is per key: one key cannot cancel another's task, and its own cancel stops only its task."""

from __future__ import annotations

from pathlib import Path

from gated import paused_server
from helpers.two_keys import V2, credits, h, status
from live_server import SMALL
from sd3serve.engine.loading import LoadedModel
from waiting import wait_for


def test_cancel_reaches_only_the_owners_task(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        a, b = server.new_key(3), server.new_key(3)
        with server.client() as c:
            running_a = c.post(V2, json={**SMALL, "steps": 2}, headers=h(a)).json()["request_id"]
            assert engine.paused.wait(60)
            queued_b = c.post(V2, json={**SMALL, "steps": 2}, headers=h(b)).json()["request_id"]
            wait_for(lambda: engine.queue_depth == 1)

            for path in (f"/v2/requests/{running_a}/cancel",):
                assert c.post(path, headers=h(b)).status_code == 404
            assert c.delete(f"/v2/requests/{running_a}", headers=h(b)).status_code == 404
            assert status(c, a, running_a) != "CANCELLED" and credits(c, a) == 2

            r = c.post(f"/v2/requests/{queued_b}/cancel", headers=h(b))
            assert r.status_code == 200 and r.json()["cancelled"] is True
            assert credits(c, b) == 3 and credits(c, a) == 2  # B refunded; A's hold untouched
            engine.gate.set()
            wait_for(lambda: status(c, a, running_a) == "COMPLETED")
            assert status(c, b, queued_b) == "CANCELLED"
            assert credits(c, a) == 2 and credits(c, b) == 3
