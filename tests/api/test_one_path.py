"""The one generation path through a live server: a client that leaves stops its job, a locked database never
stalls the model, and a full queue refuses v2 at submission."""

from __future__ import annotations

import socket
import sqlite3
import threading
from pathlib import Path

import pytest

from gated import CountingGate, GatedEngine, paused_server
from live_server import SMALL, URL, serving
from sd3serve.engine.loading import LoadedModel
from sd3serve.service import generation
from sd3serve.settings import Settings
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


def test_a_client_that_disconnects_frees_the_model_within_a_step(tiny_model: LoadedModel, tmp_path: Path) -> None:
    with paused_server(tiny_model, tmp_path, pause_at_step=2) as (server, engine):
        key = server.new_key(3)
        body = b'{"prompt": "a red circle", "width": 64, "height": 64, "steps": 20}'
        head = (f"POST {URL} HTTP/1.1\r\nHost: x\r\nx-api-key: {key}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n").encode()  # fmt: skip
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(head + body)
            assert engine.paused.wait(60)  # the job is on the model, at step 2 of 20
            assert server.store.list_keys()[-1].credits == 2  # held
        # The socket is closed: the server notices, and the engine drops the job before its next step.
        wait_for(lambda: engine.stats().aborted == 1)
        engine.gate.set()
        wait_for(lambda: engine.in_flight == 0)
        assert max(engine.steps_seen) <= 3
        wait_for(lambda: server.store.list_keys()[-1].credits == 3)  # refunded
        assert server.store.list_keys()[-1].spent == 0
        with server.client() as c:  # and the model serves the next request at once
            assert c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200


def test_a_locked_database_does_not_stall_the_model(
    tiny_model: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "PROGRESS_WRITE_INTERVAL_S", 0.0)
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0)
    engine = CountingGate(settings, tiny_model)
    with serving(settings, engine=engine) as server:
        engine.pause_at_step, engine.gate = 1, threading.Event()
        lock = sqlite3.connect(settings.data_dir / "sd3serve.db", timeout=30, isolation_level=None)
        try:
            key = server.new_key(3)
            with server.client() as c:
                task_id = c.post(SUBMIT, json={**SMALL, "steps": 8}, headers={"x-api-key": key}).json()["request_id"]
                assert engine.paused.wait(60)
                wait_for(lambda: c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()["status"]
                         == "PROCESSING")  # fmt: skip
                lock.execute("BEGIN IMMEDIATE")  # another writer holds the database (a backup, a slow peer, ...)
                engine.gate.set()
                # The batch finishes while the lock is still held: the model never waits for the database
                # (SQLite's busy timeout is 30 s per write; progress used to be written from the model's thread).
                wait_for(lambda: engine.stats().batches == 1, timeout=25)
                assert max(engine.steps_seen) == 8
                status = c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()
                assert status["status"] == "PROCESSING"  # reads go on (WAL); the result waits for the lock
                lock.execute("ROLLBACK")
                wait_for(lambda: c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()["status"]
                         == "COMPLETED")  # fmt: skip
                status = c.get(f"/v2/requests/{task_id}/status", headers={"x-api-key": key}).json()
                assert status["progress"] == {"step": 8, "steps": 8}  # progress caught up
                assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 2}
        finally:
            engine.gate.set()
            lock.close()


def test_v2_past_the_queue_limit_is_503_at_submission(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0, max_queue=1)
    engine = GatedEngine(settings, tiny_model)
    with serving(settings, engine=engine) as server:
        engine.gate.clear()
        try:
            key = server.new_key(10)
            with server.client() as c:
                h = {"x-api-key": key}
                first = c.post(SUBMIT, json=SMALL, headers=h)
                wait_for(lambda: engine.in_flight == 1)
                second = c.post(SUBMIT, json=SMALL, headers=h)
                wait_for(lambda: engine.queue_depth == 1)
                refused = c.post(SUBMIT, json=SMALL, headers=h)
                assert (first.status_code, second.status_code, refused.status_code) == (200, 200, 503)
                assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["error"]
                assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 8}  # nothing held for it
                engine.gate.set()
        finally:
            engine.gate.set()


def test_too_much_work_for_one_request_is_a_400_naming_the_limit(tmp_path: Path) -> None:
    from stub_engine import StubEngine

    settings = Settings(data_dir=tmp_path, device="cpu", max_request_work=100)
    with serving(settings, engine=StubEngine()) as server:
        key = server.new_key(10)
        h = {"x-api-key": key}
        huge = {"prompt": "a red circle", "width": 2048, "height": 2048, "steps": 70, "batch_size": 10,
                "base64": True, "sampler": "heun", "guidance_scale": 3}  # fmt: skip
        with server.client() as c:
            for path in (URL, SUBMIT):
                r = c.post(path, json=huge, headers=h)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert "SD3SERVE_MAX_REQUEST_WORK" in error and "100" in error and "11744" in error  # 4.19 MP·10·280
            # 1024², 4 steps, 4 images = 16.8 megapixel model evaluations: within the limit.
            ok = c.post(URL, json={**huge, "width": 1024, "height": 1024, "steps": 4, "batch_size": 4,
                                   "sampler": "euler", "guidance_scale": 1}, headers=h)  # fmt: skip
            assert ok.status_code == 200
            assert c.get("/v1/get-user-credits", headers=h).json() == {"credits": 6}  # only the 4 delivered


def test_stored_results_have_a_budget(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from stub_engine import StubEngine

    png = io.BytesIO()
    Image.new("RGB", (256, 256), (98 % 256, 98 % 256, 0)).save(png, format="PNG")  # what the stub stores
    size_mb = len(png.getvalue()) / 2**20
    # One stored task fills a key's budget; two fill the server's.
    settings = Settings(data_dir=tmp_path, device="cpu", storage_per_key_mb=size_mb / 2, storage_total_mb=size_mb * 1.5)
    with serving(settings, engine=StubEngine()) as server:
        first, second, third = server.new_key(5), server.new_key(5), server.new_key(5)
        with server.client() as c:
            body = {**SMALL, "image_format": "png", "width": 256, "height": 256}
            assert c.post(SUBMIT, json=body, headers={"x-api-key": first}).status_code == 200
            wait_for(lambda: server.store.get_key(key_id=1).spent == 1)
            full = c.post(SUBMIT, json=body, headers={"x-api-key": first})
            assert full.status_code == 429 and "SD3SERVE_STORAGE_PER_KEY_MB" in full.json()["error"]
            assert c.post(SUBMIT, json=body, headers={"x-api-key": second}).status_code == 200
            wait_for(lambda: server.store.get_key(key_id=2).spent == 1)
            everyone = c.post(SUBMIT, json=body, headers={"x-api-key": third})
            assert everyone.status_code == 503 and "SD3SERVE_STORAGE_TOTAL_MB" in everyone.json()["error"]
            assert everyone.headers["retry-after"]
            assert c.post(URL, json=SMALL, headers={"x-api-key": third}).status_code == 200  # v1 stores nothing
        server.store.reclaim()  # SQLite gives freed pages back (auto_vacuum incremental)
