"""Two server processes on one database; one is paused (SIGSTOP) past its heartbeat and presumed dead.

The other settles its work (tasks FAILED, holds returned). When the paused one resumes, nothing it made is
delivered: its v1 request gets 503 and its v2 task stays FAILED, with no credit spent; it learns it was presumed
dead at its next heartbeat and serves on under a new id.
"""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from helpers.ledger import open_store
from live_server import SMALL, URL
from procs import start_server
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
SLOW = {**SMALL, "width": 256, "height": 256, "steps": 70}


def test_a_paused_peer_presumed_dead_delivers_nothing_unpaid(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = {"heartbeat_s": 0.4}
    a = start_server(model_dir=tiny_model_dir, data_dir=tmp_path, log_dir=tmp_path, **settings)
    b = start_server(model_dir=tiny_model_dir, data_dir=tmp_path, log_dir=tmp_path, **settings)
    store = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    key = store.create_key(credits=10)[1]
    key_id = store.authenticate(api_key=key).id
    h = {"x-api-key": key}
    paused = False
    try:
        with httpx.Client(base_url=a.url, timeout=120) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
            task_id = ca.post(SUBMIT, json={**SLOW, "batch_size": 3}, headers=h).json()["request_id"]
            with ThreadPoolExecutor(1) as pool:
                sync = pool.submit(lambda: httpx.post(a.url + URL, json=SMALL, headers=h, timeout=120))
                wait_for(lambda: cb.get(f"/v2/requests/{task_id}/status", headers=h).json().get("progress"))
                wait_for(lambda: store.balance(key_id=key_id) == 6)  # 3 + 1 held by A
                a.proc.send_signal(signal.SIGSTOP)
                paused = True
                # B presumes A dead (3 heartbeats) and settles: the task FAILED, both holds returned.
                wait_for(lambda: cb.get(f"/v2/requests/{task_id}/status", headers=h).json()["status"] == "FAILED")
                assert store.balance(key_id=key_id) == 10
                a.proc.send_signal(signal.SIGCONT)
                paused = False
                answer = sync.result(timeout=120)
            assert answer.status_code == 503, answer.text
            assert "presumed dead" in answer.json()["error"] and answer.headers["retry-after"]
            # A has stopped what it ran; the task stays FAILED, with no image, and nothing was spent.
            wait_for(lambda: "sd3serve_engine_running 0.0" in ca.get("/metrics").text)
            for c in (ca, cb):
                status = c.get(f"/v2/requests/{task_id}", headers=h)
                assert status.status_code == 422 and status.json()["output"] == []
            key_info = store.get_key(key_id=key_id)
            assert (key_info.credits, key_info.spent) == (10, 0)
            assert "presumed dead" in a.log.read_text()
            # A serves on, and charges what it delivers.
            assert ca.post(URL, json=SMALL, headers=h).status_code == 200
            assert store.get_key(key_id=key_id).spent == 1
    finally:
        if paused:
            a.proc.send_signal(signal.SIGCONT)
        for server in (a, b):
            if server.proc.poll() is None:
                server.terminate()
        store.close()
