"""Credits under load: 4 server processes on one database, 520 concurrent requests from keys that run dry.

For each key: credits spent == price x images delivered, exactly, and balance + spent == the starting credits;
no response is a 5xx. Once on one SQLite file (WAL), once on PostgreSQL.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from helpers import postgres
from helpers.ledger import open_store
from live_server import URL
from procs import ServerProcess, start_server

PROCESSES = 4
REQUESTS = 520
BALANCES = [40, 25, 15, 8, 3]  # credits; every key runs out mid-test
BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 1}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    with postgres.pg_database("sd3serve_load") as name:
        yield postgres.database_url(name)


def test_credits_are_exact_under_load(tiny_model_dir: Path, tmp_path: Path, database_url: str) -> None:
    store = open_store(database_url)
    store.create_schema()
    keys = [store.create_key(credits=b, name=f"k{i}")[1] for i, b in enumerate(BALANCES)]
    servers: list[ServerProcess] = []
    with ThreadPoolExecutor(PROCESSES) as pool:
        servers = list(pool.map(
            lambda i: start_server(model_dir=tiny_model_dir, data_dir=tmp_path / f"p{i}", log_dir=tmp_path,
                                   database_url=database_url, max_queue=REQUESTS, max_batch_images=8),
            range(PROCESSES),
        ))  # fmt: skip
    try:
        targets = list(itertools.islice(itertools.product(servers, keys), REQUESTS)) * (
            REQUESTS // (len(servers) * len(keys)) + 1
        )
        targets = targets[:REQUESTS]
        client = httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64))

        def one(target: tuple[ServerProcess, str]) -> tuple[str, int]:
            server, key = target
            r = client.post(server.url + URL, json=BODY, headers={"x-api-key": key})
            return key, r.status_code

        with ThreadPoolExecutor(64) as pool:
            results = list(pool.map(one, targets))
    finally:
        for s in servers:
            s.terminate()
    statuses = Counter(code for _, code in results)
    assert set(statuses) <= {200, 406}, statuses
    for key, balance in zip(keys, BALANCES, strict=True):
        info = store.get_key(key_id=store.authenticate(api_key=key).id)
        delivered = sum(1 for k, code in results if k == key and code == 200)
        assert info.spent == delivered * 1, (key[:10], info, delivered)
        assert info.credits + info.spent == balance
        assert info.credits == 0  # more requests than credits: each key ran dry
    store.close()
