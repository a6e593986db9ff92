"""The stored-results budget is per key: one key at its budget does not stop another key's submissions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.two_keys import V2, credits, h, status
from live_server import SMALL, LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

BUDGET = 1024  # bytes: SD3SERVE_STORAGE_PER_KEY_MB = 1/1024


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path, device="cpu", storage_per_key_mb=BUDGET / 2**20, storage_total_mb=0)
    gen = run_live_server(settings, engine=StubEngine())
    yield next(gen)
    gen.close()


def test_one_key_at_its_budget_does_not_stop_another(server: LiveServer) -> None:
    a, b = server.new_key(50), server.new_key(50)
    tasks = server.store
    a_id, b_id = (server.store.authenticate(api_key=k).id for k in (a, b))
    with server.client() as c:
        accepted = 0
        for _ in range(50):
            before = tasks.stored_bytes(key_id=a_id)
            r = c.post(V2, json=SMALL, headers=h(a))
            if r.status_code != 200:
                break
            assert before < BUDGET  # accepted only under the budget
            accepted += 1
            wait_for(lambda r=r: status(c, a, r.json()["request_id"]) == "COMPLETED")
        assert r.status_code == 429 and "this key's stored results" in r.json()["error"], r.text
        assert tasks.stored_bytes(key_id=a_id) >= BUDGET and accepted >= 1
        assert credits(c, a) == 50 - accepted  # the refusal charged nothing
        ok = c.post(V2, json=SMALL, headers=h(b))
        assert ok.status_code == 200, ok.text
        wait_for(lambda: status(c, b, ok.json()["request_id"]) == "COMPLETED")
        assert 0 < tasks.stored_bytes(key_id=b_id) < BUDGET
