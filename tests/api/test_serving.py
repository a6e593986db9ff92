"""Serving behaviour through a live server: a free event loop, back-pressure, disconnects, metrics, logs."""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gated import GatedEngine
from live_server import SMALL, URL, LiveServer, serving
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings
from waiting import wait_for


@pytest.fixture
def gated_server(tiny_model: LoadedModel, tmp_path: Path) -> Iterator[tuple[LiveServer, GatedEngine]]:
    settings = Settings(data_dir=tmp_path, device="cpu", max_queue=1, batch_wait_ms=0)
    engine = GatedEngine(settings, tiny_model)
    with serving(settings, engine=engine) as server:
        engine.gate.clear()
        try:
            yield server, engine
        finally:
            engine.gate.set()


def test_healthz_answers_fast_while_generating(live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    body = {**SMALL, "width": 1024, "height": 1024, "steps": 8}
    with ThreadPoolExecutor(1) as pool, live_server.client() as c:
        busy = pool.submit(lambda: c.post(URL, json=body, headers={"x-api-key": key}).status_code)
        wait_for(lambda: live_server.app.state.sd3.model_engine.in_flight)
        latencies = []
        with live_server.client() as probe:
            for _ in range(9):
                t0 = time.perf_counter()
                assert probe.get("/healthz").status_code == 200
                latencies.append(time.perf_counter() - t0)
        still_busy = not busy.done()
        assert busy.result() == 200
    assert still_busy, "the generation should outlast the probes"
    assert statistics.median(latencies) < 0.05, latencies


def test_full_queue_is_503_with_retry_after(gated_server: tuple[LiveServer, GatedEngine]) -> None:
    server, engine = gated_server
    key = server.new_key(10)
    with ThreadPoolExecutor(2) as pool, server.client() as c:
        post = lambda body: c.post(URL, json=body, headers={"x-api-key": key})  # noqa: E731
        first = pool.submit(post, SMALL)
        wait_for(lambda: engine.in_flight == 1)
        second = pool.submit(post, {**SMALL, "steps": 3})
        wait_for(lambda: engine.queue_depth == 1)
        r = post({**SMALL, "steps": 3})
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["error"]
        engine.gate.set()
        assert first.result().status_code == second.result().status_code == 200
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 8}


def test_disconnected_client_is_dropped_and_not_charged(gated_server: tuple[LiveServer, GatedEngine]) -> None:
    server, engine = gated_server
    key = server.new_key(10)
    with ThreadPoolExecutor(2) as pool, server.client() as c:
        first = pool.submit(lambda: c.post(URL, json=SMALL, headers={"x-api-key": key}))
        wait_for(lambda: engine.in_flight == 1)

        def impatient() -> None:
            with httpx.Client(base_url=server.url, timeout=0.5) as quick, pytest.raises(httpx.ReadTimeout):
                quick.post(URL, json={**SMALL, "steps": 3}, headers={"x-api-key": key})

        pool.submit(impatient).result()
        wait_for(lambda: engine.queue_depth == 0)  # dropped from the queue once the client went away
        wait_for(lambda: c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 9})
        engine.gate.set()
        assert first.result().status_code == 200
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 9}


def test_metrics(live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    with live_server.client() as c:
        assert c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
        c.get("/nope")
        text = c.get("/metrics").text
    assert 'sd3serve_requests_total{method="POST",route="/v1/stable-diffusion-3.5-turbo-txt2img",status="200"}' in text
    assert 'route="unmatched",status="404"' in text
    for name in (
        "sd3serve_queue_depth",
        "sd3serve_batch_images_bucket",
        "sd3serve_generation_seconds_count",
        "sd3serve_credits_charged_total",
        "sd3serve_images_total",
        "sd3serve_prompt_cache_hits",
    ):
        assert name in text, name


def test_access_log_is_json_with_request_id_and_no_key(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    key = live_server.new_key(5)
    with caplog.at_level(logging.INFO, logger="sd3serve.access"), live_server.client() as c:
        r = c.post(URL, json=SMALL, headers={"x-api-key": key})
        wait_for(lambda: any(rec.name == "sd3serve.access" and "POST" in rec.getMessage() for rec in caplog.records))
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "sd3serve.access"]
    entry = next(e for e in lines if e["request_id"] == r.headers["x-request-id"])
    assert entry["status"] == 200 and entry["method"] == "POST" and isinstance(entry["key_id"], int)
    assert key not in caplog.text


def test_readyz_only_when_loaded(tiny_model: LoadedModel, tmp_path: Path) -> None:
    from sd3serve.engine.batching import BatchingEngine

    engine = BatchingEngine(Settings(device="cpu"), tiny_model)
    assert not engine.is_ready
    with serving(Settings(data_dir=tmp_path, device="cpu"), engine=engine) as server:
        assert engine.is_ready
        with server.client() as c:
            assert c.get("/readyz").json() == {"status": "ready"}
