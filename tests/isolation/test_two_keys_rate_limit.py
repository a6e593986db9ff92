"""Rate limits count per key: one key at its limit does not slow another."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.ledger import open_store
from helpers.two_keys import V1, h
from live_server import SMALL, LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine

LIMIT = 3


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu", rate_limit_per_minute=LIMIT), engine=StubEngine())
    yield next(gen)
    gen.close()


def test_limit_at_its_edge_per_key(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_schema()
    try:
        limiter = store
        (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
        now = 600.0 * 60 + 30  # the middle of a minute
        assert [limiter.hit(key_id=a.id, per_minute=LIMIT, now=now).allowed for _ in range(LIMIT + 1)] == [
            True, True, True, False]  # fmt: skip
        assert limiter.hit(key_id=b.id, per_minute=LIMIT, now=now).allowed  # B has its own count
        decision = limiter.hit(key_id=a.id, per_minute=LIMIT, now=now + 30)  # the next minute: A's count restarts
        assert decision.allowed and decision.reset_at == 602 * 60
    finally:
        store.close()


def test_a_key_at_its_limit_does_not_slow_another(server: LiveServer) -> None:
    a, b = server.new_key(20), server.new_key(20)
    with server.client() as c:
        codes = []
        for _ in range(2 * LIMIT + 2):  # a minute may turn once while we send: at most two windows' worth
            codes.append(c.post(V1, json=SMALL, headers=h(a)).status_code)
            if codes[-1] == 429:
                break
        assert codes[-1] == 429 and codes.count(200) >= LIMIT
        assert c.post(V1, json=SMALL, headers=h(b)).status_code == 200
