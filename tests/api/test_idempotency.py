"""Idempotent retries through a live server: the first answer again, charged once; another body is a 422; a
duplicate in flight is a 409 with Retry-After; a failed request can be retried."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gated import GatedEngine
from live_server import SMALL, URL, LiveServer, serving
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings
from stub_engine import StubEngine

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"


def credits(server: LiveServer, key: str) -> float:
    return server.store.authenticate(api_key=key).credits


def test_retries_get_the_first_answer_and_are_charged_once(live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    with live_server.client() as c:
        h = {"x-api-key": key, "Idempotency-Key": "order-42"}
        body = {**SMALL, "seed": -1}  # a random seed: the retry must still get the same picture
        first = c.post(URL, json=body, headers=h)
        retry = c.post(URL, json=body, headers=h)
        assert first.status_code == retry.status_code == 200
        assert retry.content == first.content and retry.headers["x-seed-value"] == first.headers["x-seed-value"]
        assert retry.headers["idempotent-replayed"] == "true" and "idempotent-replayed" not in first.headers
        assert credits(live_server, key) == 9

        other = c.post(URL, json={**body, "prompt": "a blue square"}, headers=h)
        assert other.status_code == 422 and "another request body" in other.json()["error"]
        v2_same_key = c.post(SUBMIT, json=body, headers=h)  # another route is another request
        assert v2_same_key.status_code == 422

        h2 = {"x-api-key": key, "Idempotency-Key": "task-7"}
        task = c.post(SUBMIT, json=SMALL, headers=h2).json()["request_id"]
        again = c.post(SUBMIT, json=SMALL, headers=h2)
        assert again.json()["request_id"] == task and again.headers["idempotent-replayed"] == "true"
        assert credits(live_server, key) == 8
        assert c.post(URL, json=SMALL, headers={"x-api-key": key, "Idempotency-Key": ""}).status_code == 400


def test_a_duplicate_in_flight_is_409_then_replayed(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0)
    engine = GatedEngine(settings, tiny_model)
    with serving(settings, engine=engine) as server:
        engine.gate = threading.Event()
        try:
            key = server.new_key(5)
            h = {"x-api-key": key, "Idempotency-Key": "once"}
            with server.client() as c, ThreadPoolExecutor(1) as pool:
                first = pool.submit(c.post, URL, json=SMALL, headers=h)
                assert engine.paused.wait(60)
                duplicate = c.post(URL, json=SMALL, headers=h)
                assert duplicate.status_code == 409 and duplicate.headers["retry-after"] == "1"
                engine.gate.set()
                assert first.result().status_code == 200
                replay = c.post(URL, json=SMALL, headers=h)
                assert replay.content == first.result().content
            assert credits(server, key) == 4
        finally:
            engine.gate.set()


def test_a_failed_request_can_be_retried_with_its_key(tmp_path: Path) -> None:
    from stub_engine import FailingEngine

    with serving(Settings(data_dir=tmp_path, device="cpu"), engine=FailingEngine()) as server:
        key = server.new_key(3)
        h = {"x-api-key": key, "Idempotency-Key": "flaky"}
        with server.client() as c:
            assert c.post(URL, json=SMALL, headers=h).status_code == 500
            assert c.post(URL, json=SMALL, headers=h).status_code == 500  # ran again, not a 409 or a replay
        assert credits(server, key) == 3


def test_replay_works_with_the_stub_engine_too(tmp_path: Path) -> None:
    with serving(Settings(data_dir=tmp_path, device="cpu"), engine=StubEngine()) as server:
        key = server.new_key(20)
        h = {"x-api-key": key, "Idempotency-Key": "batch"}
        body = {**SMALL, "batch_size": 3, "base64": True}
        with server.client() as c:
            first, retry = c.post(URL, json=body, headers=h).json(), c.post(URL, json=body, headers=h).json()
        assert first == retry and len(first["images"]) == 3
        assert credits(server, key) == 17


def test_the_openai_route_is_idempotent_too(live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    h = {"Authorization": f"Bearer {key}", "Idempotency-Key": "img-1"}
    body = {"prompt": "a red circle", "size": "256x256", "response_format": "b64_json"}
    with live_server.client() as c:
        first, retry = c.post("/v1/images/generations", json=body, headers=h), c.post(
            "/v1/images/generations", json=body, headers=h
        )
        assert first.status_code == retry.status_code == 200
        assert first.json()["data"] == retry.json()["data"] and retry.headers["idempotent-replayed"] == "true"
    assert credits(live_server, key) == 9
