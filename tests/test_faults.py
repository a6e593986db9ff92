"""Faults: a generation failing mid-way, a process killed mid-generation, the database going away, SIGTERM."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.ledger import open_store
from helpers.postgres import pg_database
from live_server import SMALL, URL, run_live_server
from procs import TcpProxy, start_server
from sd3serve.engine.batching import BatchingEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

SLOW = {**SMALL, "width": 512, "height": 512, "steps": 70}  # seconds on the tiny model


class FailsAtStep2(BatchingEngine):
    """The real engine, whose pipeline raises after step 1 of 3 (an out-of-memory, say) for odd seeds."""

    @property
    def pipeline(self) -> SD3Pipeline:
        real = super().pipeline

        class Failing:
            prompt_cache = real.prompt_cache

            def generate_many(self, jobs: list[GenerationJob], progress: Any = None, **kwargs: Any) -> Any:
                def step(done: int, total: int) -> None:
                    if done == 2 and jobs[0].seed % 2:
                        raise RuntimeError("CUDA out of memory (simulated)")

                return real.generate_many(jobs, progress=step, **kwargs)

        return Failing()  # type: ignore[return-value]


def test_failure_mid_generation_is_500_and_free(tiny_model: LoadedModel, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu")
    gen = run_live_server(settings, engine=FailsAtStep2(settings, tiny_model))
    server = next(gen)
    try:
        key = server.new_key(3)
        with server.client() as c:
            r = c.post(URL, json={**SMALL, "steps": 3, "seed": 1}, headers={"x-api-key": key})
            assert r.status_code == 500 and "nothing was charged" in r.json()["error"]
            assert c.post(URL, json={**SMALL, "steps": 3, "seed": 2}, headers={"x-api-key": key}).status_code == 200
            assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 2}
    finally:
        gen.close()


def test_sigkill_mid_generation_loses_and_double_charges_nothing(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = {"heartbeat_s": 0.3}
    first = start_server(model_dir=tiny_model_dir, data_dir=tmp_path, log_dir=tmp_path, **settings)
    store = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    key = store.create_key(credits=10)[1]
    key_id = store.authenticate(api_key=key).id
    h = {"x-api-key": key}
    try:
        with httpx.Client(base_url=first.url, timeout=120) as c, ThreadPoolExecutor(1) as pool:
            done = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=SMALL, headers=h).json()["request_id"]
            wait_for(lambda: c.get(f"/v2/requests/{done}/status", headers=h).json()["status"] == "COMPLETED")
            slow_task = c.post("/v2/stable-diffusion-3.5-turbo-txt2img", json=SLOW, headers=h).json()["request_id"]
            in_flight = pool.submit(lambda: httpx.post(first.url + URL, json=SLOW, headers=h, timeout=120))
            wait_for(lambda: c.get(f"/v2/requests/{slow_task}/status", headers=h).json()["status"] == "PROCESSING")
            wait_for(lambda: store.balance(key_id=key_id) == 7)  # 1 spent, 2 held by the two in flight
            first.kill()
            with pytest.raises(httpx.TransportError):
                in_flight.result()
    finally:
        if first.proc.poll() is None:
            first.kill()

    second = start_server(model_dir=tiny_model_dir, data_dir=tmp_path, log_dir=tmp_path, **settings)
    try:
        with httpx.Client(base_url=second.url, timeout=60) as c:
            wait_for(lambda: c.get(f"/v2/requests/{slow_task}/status", headers=h).status_code == 422)
            status = c.get(f"/v2/requests/{slow_task}/status", headers=h).json()
            assert status["status"] == "FAILED" and "stopped" in status["error"]
            assert c.get(f"/v2/requests/{done}", headers=h).json()["status"] == "COMPLETED"
            wait_for(lambda: store.balance(key_id=key_id) == 9)  # both holds returned, the completed task kept
            assert store.get_key(key_id=key_id).spent == 1
            assert c.post(URL, json=SMALL, headers=h).status_code == 200
            assert store.get_key(key_id=key_id).spent == 2
    finally:
        second.terminate()
        store.close()


def test_sigterm_finishes_in_flight_then_exits(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = start_server(model_dir=tiny_model_dir, data_dir=tmp_path, log_dir=tmp_path)
    store = open_store(f"sqlite:///{tmp_path / 'sd3serve.db'}")
    key = store.create_key(credits=5)[1]
    h = {"x-api-key": key}
    with ThreadPoolExecutor(1) as pool:
        body = {**SLOW, "steps": 20}
        in_flight = pool.submit(lambda: httpx.post(server.url + URL, json=body, headers=h, timeout=120))
        # In flight: the POST and this GET of /metrics itself.
        wait_for(lambda: "sd3serve_requests_in_flight 2.0" in httpx.get(server.url + "/metrics").text)
        # uvicorn shuts down gracefully, then re-raises SIGTERM so that the exit status tells how it ended.
        assert server.terminate(timeout=120) in (0, -signal.SIGTERM)
        assert in_flight.result().status_code == 200
    with pytest.raises(httpx.TransportError):
        httpx.post(server.url + URL, json=SMALL, headers=h, timeout=5)
    assert store.balance(key_id=store.authenticate(api_key=key).id) == 4
    store.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    with pg_database("sd3serve_faults") as name:
        yield name


def test_database_away_is_503_and_recovers(tmp_path: Path, pg_url: str) -> None:
    proxy = TcpProxy(5432)
    proxy.start()
    url = f"postgresql://postgres@127.0.0.1:{proxy.port}/{pg_url}"
    gen = run_live_server(Settings(data_dir=tmp_path, database_url=url, heartbeat_s=0.5), engine=StubEngine())
    server = next(gen)
    try:
        key = server.new_key(5)
        with server.client() as c:
            assert c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
            proxy.stop()
            r = c.post(URL, json=SMALL, headers={"x-api-key": key})
            assert r.status_code == 503 and "database" in r.json()["error"] and r.headers["retry-after"]
            assert c.get("/healthz").status_code == 200
            proxy.start()
            assert wait_for(lambda: c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200)
            assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}
    finally:
        proxy.stop()
        gen.close()
