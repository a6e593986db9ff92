"""Idempotency-Keys are per API key: the same key string used by two API keys names two requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gated import paused_server
from helpers.ledger import open_store
from helpers.two_keys import V1, V2, credits, h
from live_server import SMALL, LiveServer
from sd3serve.engine.loading import LoadedModel
from sd3serve.errors import IdempotencyInProgress
from sd3serve.ledger.idempotency import Claim


def test_the_same_idempotency_key_under_two_api_keys(stub_server: LiveServer) -> None:
    a, b = stub_server.new_key(5), stub_server.new_key(5)
    with stub_server.client() as c:
        first_a = c.post(V2, json=SMALL, headers=h(a, **{"Idempotency-Key": "same"})).json()
        first_b = c.post(V2, json=SMALL, headers=h(b, **{"Idempotency-Key": "same"})).json()
        assert first_a["request_id"] != first_b["request_id"]  # B's request ran: it is not A's retry
        again_b = c.post(V2, json=SMALL, headers=h(b, **{"Idempotency-Key": "same"})).json()
        assert again_b["request_id"] == first_b["request_id"]  # B's retry is B's first answer
        assert credits(c, a) == 4 and credits(c, b) == 4
        # A different body under A's key is a conflict for A only.
        other = {**SMALL, "seed": 7}
        assert c.post(V2, json=other, headers=h(a, **{"Idempotency-Key": "same"})).status_code == 422
        assert c.post(V2, json=other, headers=h(b, **{"Idempotency-Key": "fresh"})).status_code == 200


def test_an_answer_is_never_written_to_another_keys_claim(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_schema()
    try:
        (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
        assert store.begin(key_id=a.id, idem_key="same", fingerprint="fa") is None
        assert store.begin(key_id=b.id, idem_key="same", fingerprint="fb") is None
        with store.db.transaction() as tx:  # A's charging transaction records A's answer
            tx.idempotency.answer(Claim(a.id, "same"), b"answer of A")
        assert store.begin(key_id=a.id, idem_key="same", fingerprint="fa") == b"answer of A"
        with pytest.raises(IdempotencyInProgress):  # B's request is still running: no answer for it yet
            store.begin(key_id=b.id, idem_key="same", fingerprint="fb")
        store.abandon(Claim(b.id, "same"))  # B's request failed: its claim goes, A's answer stays
        assert store.begin(key_id=a.id, idem_key="same", fingerprint="fa") == b"answer of A"
        assert store.begin(key_id=b.id, idem_key="same", fingerprint="fb") is None
    finally:
        store.close()


def test_a_running_claim_of_one_key_does_not_get_another_keys_answer(tiny_model: LoadedModel, tmp_path: Path) -> None:
    """B's synchronous request holds its claim of "shared" while A's submission with "shared" is answered."""
    with paused_server(tiny_model, tmp_path, pause_at_step=1) as (server, engine):
        a, b = server.new_key(3), server.new_key(3)
        idem = {"Idempotency-Key": "shared"}
        body_b = {**SMALL, "steps": 2, "seed": 11}
        with server.client() as c, ThreadPoolExecutor(1) as pool:
            running_b = pool.submit(c.post, V1, json=body_b, headers=h(b, **idem))
            try:
                assert engine.paused.wait(60)  # B's request runs, its claim has no answer yet
                task_a = c.post(V2, json={**SMALL, "steps": 2}, headers=h(a, **idem)).json()["request_id"]
                retry_b = c.post(V1, json=body_b, headers=h(b, **idem))
                assert retry_b.status_code == 409, retry_b.text  # still running: not A's answer
            finally:
                engine.gate.set()
            first_b = running_b.result(timeout=120)
            assert first_b.status_code == 200
            replay_b = c.post(V1, json=body_b, headers=h(b, **idem))
            assert replay_b.status_code == 200 and replay_b.content == first_b.content
            assert c.post(V2, json={**SMALL, "steps": 2}, headers=h(a, **idem)).json()["request_id"] == task_a
            assert credits(c, a) == 2 and credits(c, b) == 2


def test_giving_a_claim_back_leaves_other_claims_alone(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_schema()
    try:
        (a, _), (b, _) = store.create_key(credits=1), store.create_key(credits=1)
        for key_id, name in ((a.id, "same"), (b.id, "same"), (a.id, "other")):
            assert store.begin(key_id=key_id, idem_key=name, fingerprint="f") is None
        store.abandon(Claim(a.id, "same"))  # A's request failed
        assert store.begin(key_id=a.id, idem_key="same", fingerprint="f") is None  # A may retry at once
        for key_id, name in ((b.id, "same"), (a.id, "other")):  # B's claim and A's other claim still run
            with pytest.raises(IdempotencyInProgress):
                store.begin(key_id=key_id, idem_key=name, fingerprint="f")
    finally:
        store.close()
