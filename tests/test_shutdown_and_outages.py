"""A refund while the database is away, made once when it returns; shutdown with a v2 task running."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest

from gated import CountingGate
from helpers.ledger import open_store
from helpers.postgres import database_url, pg_database
from helpers.two_keys import V2, h
from live_server import SMALL, run_live_server
from procs import TcpProxy
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings
from waiting import wait_for


@pytest.fixture
def pg_name() -> Iterator[str]:
    with pg_database("sd3serve_outage") as name:
        yield name


def balances(name: str) -> dict[int, tuple[int, int]]:
    """(balance, spent) in micro-credits per key id, read past the proxy."""
    with psycopg.connect(database_url(name)) as conn:
        rows = conn.execute("SELECT id, balance_micro, spent_micro FROM api_keys").fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def test_a_refund_during_an_outage_is_made_once_when_the_database_returns(pg_name: str) -> None:
    proxy = TcpProxy(5432)
    proxy.start()
    store = open_store(f"postgresql://postgres@127.0.0.1:{proxy.port}/{pg_name}")
    try:
        store.create_schema()
        (a, _), (b, _) = store.create_key(credits=5), store.create_key(credits=5)
        held_a = store.reserve(key_id=a.id, credits=Decimal(2), request_id="ra", owner="test")
        held_b = store.reserve(key_id=b.id, credits=Decimal(1), request_id="rb", owner="test")
        proxy.stop()
        held_a.close()  # the database is away: no error, the refund is remembered
        held_a.close()  # idempotent: remembered once
        with pytest.raises(Exception):  # noqa: B017 - whichever driver error: fail() says the refund did not happen
            held_b.fail()
        assert store.retry_deferred() == 1  # still away: still pending
        assert balances(pg_name) == {a.id: (3_000_000, 0), b.id: (4_000_000, 0)}  # nothing refunded yet
        proxy.start()
        assert wait_for(lambda: store.retry_deferred() == 0)
        held_b.fail()  # the caller's retry, now that the database is back
        assert balances(pg_name) == {a.id: (5_000_000, 0), b.id: (5_000_000, 0)}
        assert store.retry_deferred() == 0
        held_a.close()
        held_b.close()
        assert balances(pg_name) == {a.id: (5_000_000, 0), b.id: (5_000_000, 0)}  # never refunded twice
    finally:
        proxy.stop()
        store.close()


def _shutdown(tiny_model: LoadedModel, tmp_path: Path, grace_s: float, caplog: pytest.LogCaptureFixture,
              release_during_drain: bool) -> tuple[str, str | None, tuple[float, float]]:  # fmt: skip
    """Submit a v2 task, pause it at step 1, shut the server down; (status, error, (credits, spent)) after."""
    settings = Settings(data_dir=tmp_path, device="cpu", batch_wait_ms=0, shutdown_grace_s=grace_s)
    engine = CountingGate(settings, tiny_model)
    gen = run_live_server(settings, engine=engine)
    server = next(gen)
    engine.pause_at_step, engine.gate = 1, threading.Event()
    key = server.new_key(3)
    closer = threading.Thread(target=gen.close)
    try:
        with server.client() as c:
            task_id = c.post(V2, json={**SMALL, "steps": 3}, headers=h(key)).json()["request_id"]
        assert engine.paused.wait(60)
        with caplog.at_level(logging.INFO, logger="sd3serve"):
            closer.start()
            assert wait_for(lambda: any("v2 task(s)" in r.getMessage() for r in caplog.records))
            if release_during_drain:
                engine.gate.set()
            closer.join(120 if release_during_drain else grace_s + 60)
    finally:
        engine.gate.set()
        if closer.is_alive():
            closer.join(120)
    store = open_store(settings.resolved_database_url)
    try:
        key_id = store.authenticate(api_key=key).id
        task = store.get(task_id=task_id, key_id=key_id)
        info = store.get_key(key_id=key_id)
        return task.status, task.error, (info.credits, info.spent)
    finally:
        store.close()


def test_shutdown_lets_a_running_task_finish_within_the_grace(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status, error, money = _shutdown(tiny_model, tmp_path, 120, caplog, release_during_drain=True)
    assert (status, error, money) == ("COMPLETED", None, (2, 1))


def test_shutdown_fails_and_refunds_a_task_past_the_grace(
    tiny_model: LoadedModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status, error, money = _shutdown(tiny_model, tmp_path, 0.5, caplog, release_during_drain=False)
    assert status == "FAILED" and "shut down" in str(error) and "nothing was charged" in str(error)
    assert money == (3, 0)
