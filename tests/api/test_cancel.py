"""Cancelling v2 tasks: queued or running, here or in another process on the same database; nothing charged."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx

from gated import CountingGate, paused_server
from live_server import SMALL, run_live_server
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


def status(c: httpx.Client, key: str, task_id: str) -> dict[str, object]:
    return c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()  # type: ignore[no-any-return]


def test_cancel_queued_and_running_tasks(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=2) as (server, engine):
        key, other = server.new_key(5), server.new_key(5)
        h = {"x-api-key": key}
        with server.client() as c:
            running = c.post(SUBMIT, json={**SMALL, "steps": 20}, headers=h).json()["request_id"]
            assert engine.paused.wait(60)
            queued = c.post(SUBMIT, json={**SMALL, "steps": 3}, headers=h).json()["request_id"]
            wait_for(lambda: engine.queue_depth == 1)
            assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 3}

            assert c.post(f"/v2/requests/{queued}/cancel", headers={"x-api-key": other}).status_code == 404
            r = c.post(f"/v2/requests/{queued}/cancel", headers=h)
            assert r.status_code == 200 and r.json()["cancelled"] is True and r.json()["status"] == "CANCELLED"
            assert engine.queue_depth == 0
            again = c.delete(f"/v2/requests/{queued}", headers=h).json()
            assert (again["cancelled"], again["status"], again["message"]) == (False, "CANCELLED", "already cancelled")

            r = c.delete(f"/v2/requests/{running}", headers=h)
            assert r.json()["cancelled"] is True
            assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 5}  # both refunded at once
            engine.gate.set()
            wait_for(lambda: engine.in_flight == 0)
            assert max(engine.steps_seen) <= 3  # the running one stopped at its next step
            for task_id in (queued, running):
                s = status(c, key, task_id)
                assert s["status"] == "CANCELLED" and "nothing was charged" in str(s["error"])
                result = c.get(f"/v2/requests/{task_id}", headers=h)
                assert result.status_code == 200 and result.json()["output"] == []

            done = c.post(SUBMIT, json={**SMALL, "steps": 2}, headers=h).json()["request_id"]
            wait_for(lambda: status(c, key, done)["status"] == "COMPLETED")
            late = c.post(f"/v2/requests/{done}/cancel", headers=h).json()
            assert (late["cancelled"], late["status"]) == (False, "COMPLETED")
            key_info = server.store.list_keys()[0]
            assert (key_info.credits, key_info.spent) == (4, 1)


def test_cancel_through_another_process_stops_the_run(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0, heartbeat_s=0.2)
    engine = CountingGate(settings, tiny_model)
    gen_a = run_live_server(settings, engine=engine)
    gen_b = run_live_server(settings, engine=CountingGate(settings, tiny_model))
    a, b = next(gen_a), next(gen_b)
    engine.pause_at_step, engine.gate = 2, threading.Event()
    try:
        key = a.new_key(2)
        h = {"x-api-key": key}
        with a.client() as ca, b.client() as cb:
            task_id = ca.post(SUBMIT, json={**SMALL, "steps": 20}, headers=h).json()["request_id"]
            assert engine.paused.wait(60)
            assert cb.post(f"/v2/requests/{task_id}/cancel", headers=h).json()["cancelled"] is True
            assert cb.get("/v1/get-user-credits", headers=h).json() == {"credits": 2}
            wait_for(lambda: engine.stats().aborted == 1)  # A notices within a heartbeat
            engine.gate.set()
            wait_for(lambda: engine.in_flight == 0)
            assert max(engine.steps_seen) <= 3
            assert status(ca, key, task_id)["status"] == "CANCELLED"
    finally:
        engine.gate.set()
        gen_a.close()
        gen_b.close()


def test_revoking_a_key_cancels_its_unfinished_tasks(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        key = server.new_key(3)
        with server.client() as c:
            assert c.post(SUBMIT, json={**SMALL, "steps": 4}, headers={"x-api-key": key}).status_code == 200
            assert engine.paused.wait(60)
            key_id = server.store.authenticate(api_key=key).id
            server.store.revoke(key_id=key_id)
            info = server.store.get_key(key_id=key_id)
            assert (info.credits, info.spent, info.revoked) == (3, 0, True)  # refunded: it cannot collect it
            engine.gate.set()
            wait_for(lambda: engine.in_flight == 0)
            assert server.store.get_key(key_id=key_id).spent == 0  # the run's late capture was refused
