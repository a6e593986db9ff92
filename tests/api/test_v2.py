"""The asynchronous v2 API through a live server."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gated import GatedEngine
from live_server import SMALL, LiveServer, serving
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.loading import LoadedModel
from sd3serve.service import generation
from sd3serve.settings import Settings
from stub_engine import FailingEngine

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


def submit(c: httpx.Client, key: str, body: dict[str, Any]) -> dict[str, Any]:
    r = c.post(SUBMIT, json=body, headers={"x-api-key": key})
    assert r.status_code == 200, r.text
    return r.json()


def wait_done(c: httpx.Client, key: str, task_id: str, timeout: float = 120) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key})
        if r.json()["status"] in ("COMPLETED", "FAILED"):
            return r
        time.sleep(0.05)  # a client polls; so does this test
    raise AssertionError(f"task {task_id} did not finish")


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c


def test_submit_poll_result_images(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    sub = submit(client, key, {**SMALL, "seed": 21, "batch_size": 2, "image_format": "png"})
    task_id = sub["request_id"]
    assert sub["status"] == "QUEUED"
    assert sub["status_url"] == sub["poll_url"] == f"{live_server.url}/v2/requests/{task_id}/status"
    assert sub["response_url"] == f"{live_server.url}/v2/requests/{task_id}"
    assert wait_done(client, key, task_id).json() == {"request_id": task_id, "status": "COMPLETED",
                                                      "progress": {"step": 2, "steps": 2}}  # fmt: skip
    result = client.get(sub["response_url"], headers={"x-api-key": key}).json()
    assert result["status"] == "COMPLETED" and result["seed"] == 21
    assert result["metrics"]["inference_time"] > 0
    assert result["output"] == [f"{live_server.url}/v2/requests/{task_id}/images/{i}" for i in range(2)]
    for i, url in enumerate(result["output"]):
        img = client.get(url, headers={"x-api-key": key})
        assert img.headers["content-type"] == "image/png"
        single = client.post("/v1/stable-diffusion-3.5-turbo-txt2img", json={**SMALL, "seed": 21 + i,
                             "image_format": "png"}, headers={"x-api-key": key})  # fmt: skip
        assert img.content == single.content
    # Charged on completion: 2 for the task, 2 for the two v1 checks.
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 6}


def test_base64_output(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    task_id = submit(client, key, {**SMALL, "base64": True})["request_id"]
    wait_done(client, key, task_id)
    out = client.get(f"/v2/requests/{task_id}", headers={"x-api-key": key}).json()["output"]
    assert len(out) == 1 and base64.b64decode(out[0])[:3] == b"\xff\xd8\xff"


def test_only_the_owner_can_read(client: httpx.Client, live_server: LiveServer) -> None:
    owner, other = live_server.new_key(5), live_server.new_key(5)
    task_id = submit(client, owner, SMALL)["request_id"]
    wait_done(client, owner, task_id)
    for path in (f"/v2/requests/{task_id}/status", f"/v2/requests/{task_id}", f"/v2/requests/{task_id}/images/0"):
        assert client.get(path, headers={"x-api-key": other}).status_code == 404
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"x-api-key": owner}).status_code == 200
    assert client.get("/v2/requests/nope/status", headers={"x-api-key": owner}).status_code == 404
    assert client.get(f"/v2/requests/{task_id}/images/5", headers={"x-api-key": owner}).status_code == 404


def test_submission_errors_charge_nothing(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(1)
    r = client.post(SUBMIT, json={**SMALL, "steps": 0}, headers={"x-api-key": key})
    assert r.status_code == 400
    r = client.post(SUBMIT, json={**SMALL, "batch_size": 2}, headers={"x-api-key": key})
    assert r.status_code == 406
    assert client.post("/v2/stable-diffusion-xl", json=SMALL, headers={"x-api-key": key}).status_code == 404
    assert client.get(SUBMIT, headers={"x-api-key": key}).status_code == 405
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 1}


def test_failed_task_is_422_and_free(tmp_path: Path) -> None:
    with serving(Settings(data_dir=tmp_path, device="cpu"), engine=FailingEngine()) as server:
        key = server.new_key(3)
        with server.client() as c:
            task_id = submit(c, key, SMALL)["request_id"]
            status = wait_done(c, key, task_id)
            assert status.status_code == 422
            assert status.json()["status"] == "FAILED" and "nothing was charged" in status.json()["error"]
            result = c.get(f"/v2/requests/{task_id}", headers={"x-api-key": key})
            assert result.status_code == 422 and result.json()["output"] == []
            assert "secret" not in result.text
            assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}


def test_progress_while_processing(tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generation, "PROGRESS_WRITE_INTERVAL_S", 0.0)
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0)
    engine = GatedEngine(settings, tiny_model)
    with serving(settings, engine=engine) as server:
        try:
            key = server.new_key(3)
            engine.pause_at_step, engine.gate = 2, threading.Event()
            with server.client() as c:
                task_id = submit(c, key, {**SMALL, "steps": 4})["request_id"]
                assert engine.paused.wait(60)
                # Progress reaches the database from the event loop, shortly after the engine reported it.
                expected = {"request_id": task_id, "status": "PROCESSING", "progress": {"step": 2, "steps": 4}}
                deadline = time.monotonic() + 30
                status_url = f"/v2/requests/{task_id}/status"
                while (status := c.get(status_url, headers={"x-api-key": key}).json()) != expected:
                    assert time.monotonic() < deadline, status
                    time.sleep(0.02)
                result = c.get(f"/v2/requests/{task_id}", headers={"x-api-key": key}).json()
                assert result["status"] == "PROCESSING" and result["output"] == []
                engine.gate.set()
                assert wait_done(c, key, task_id).json()["status"] == "COMPLETED"
        finally:
            engine.gate.set()


def test_tasks_are_shared_by_processes_on_one_database(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu")
    with (
        serving(settings, engine=BatchingEngine(settings, tiny_model)) as a,
        serving(settings, engine=BatchingEngine(settings, tiny_model)) as b,
    ):
        key = a.new_key(2)
        with a.client() as ca, b.client() as cb:
            task_id = submit(ca, key, SMALL)["request_id"]
            assert wait_done(cb, key, task_id).json()["status"] == "COMPLETED"
            url = cb.get(f"/v2/requests/{task_id}", headers={"x-api-key": key}).json()["output"][0]
            assert url.startswith(b.url)
            assert cb.get(url, headers={"x-api-key": key}).status_code == 200


def test_results_expire(live_server: LiveServer, client: httpx.Client) -> None:
    key = live_server.new_key(2)
    task_id = submit(client, key, SMALL)["request_id"]
    wait_done(client, key, task_id)
    tasks = live_server.store
    assert tasks.delete_expired() == 0  # kept for task_ttl_s (an hour by default)
    with live_server.store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE tasks SET expires_at = '2000-01-01 00:00:00' WHERE id = ?", (task_id,))
    assert tasks.delete_expired() == 1
    assert client.get(f"/v2/requests/{task_id}", headers={"x-api-key": key}).status_code == 404


def test_base64_results_are_streamed_whole(live_server: LiveServer, client: httpx.Client) -> None:
    key = live_server.new_key(3)
    h = {"x-api-key": key}
    task_id = submit(client, key, {**SMALL, "base64": True, "batch_size": 3})["request_id"]
    wait_done(client, key, task_id)
    r = client.get(f"/v2/requests/{task_id}", headers=h)
    body = r.json()  # streamed one image at a time, still one JSON document
    assert r.headers["content-type"] == "application/json"
    assert set(body) == {"request_id", "status", "output", "metrics", "seed"} and body["status"] == "COMPLETED"
    assert len(body["output"]) == 3
    for i, encoded in enumerate(body["output"]):
        assert base64.b64decode(encoded) == client.get(f"/v2/requests/{task_id}/images/{i}", headers=h).content
