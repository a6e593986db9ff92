"""Revoking one key cancels and refunds that key's unfinished tasks, and nobody else's."""

from __future__ import annotations

from pathlib import Path

from gated import paused_server
from helpers.two_keys import V2, credits, h, status
from live_server import SMALL
from sd3serve.engine.loading import LoadedModel
from waiting import wait_for


def test_revoking_one_key_leaves_the_other_keys_tasks_alone(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        a, b = server.new_key(3), server.new_key(3)
        with server.client() as c:
            running_b = c.post(V2, json={**SMALL, "steps": 2}, headers=h(b)).json()["request_id"]
            assert engine.paused.wait(60)
            queued_a = c.post(V2, json={**SMALL, "steps": 2}, headers=h(a)).json()["request_id"]
            queued_b = c.post(V2, json={**SMALL, "steps": 2}, headers=h(b)).json()["request_id"]
            wait_for(lambda: engine.queue_depth == 2)
            a_id, b_id = (server.store.authenticate(api_key=k).id for k in (a, b))

            server.store.revoke(key_id=a_id)
            info_a, info_b = server.store.get_key(key_id=a_id), server.store.get_key(key_id=b_id)
            assert (info_a.credits, info_a.spent, info_a.revoked) == (3, 0, True)
            assert (info_b.credits, info_b.spent, info_b.revoked) == (1, 0, False)  # both of B's still held
            assert status(c, b, running_b) != "CANCELLED" and status(c, b, queued_b) != "CANCELLED"
            assert c.get(f"/v2/requests/{queued_a}/status", headers=h(a)).status_code == 401

            engine.gate.set()
            wait_for(lambda: status(c, b, running_b) == "COMPLETED" and status(c, b, queued_b) == "COMPLETED")
            assert credits(c, b) == 1
            assert server.store.get_key(key_id=b_id).spent == 2
            assert server.store.get_key(key_id=a_id).spent == 0
