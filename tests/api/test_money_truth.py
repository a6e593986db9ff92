"""Money and what the server says about it, through a live server with two keys: the storage budget counts every
stored answer on every route, an Idempotency-Key covers the whole request (webhook included) and one key's
Idempotency-Key never reaches another key, admin amounts are JSON numbers, a revoked key gets no top-up, and the
documentation pages cannot be framed."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import SMALL, URL, LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
GENERATIONS = "/v1/images/generations"
ADMIN_KEY = "adm-" + secrets.token_urlsafe(32)
BUDGET_MB = 0.0001  # about 100 bytes: one stored answer fills a key's budget


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path, device="cpu", admin_key=ADMIN_KEY, storage_per_key_mb=BUDGET_MB,
                        webhook_allow_private=True)  # fmt: skip
    yield from run_live_server(settings, engine=StubEngine())


def _credits(server: LiveServer, key: str) -> float:
    return server.store.authenticate(api_key=key).credits


# --- the storage budget -------------------------------------------------------------------------------------


def test_every_stored_answer_counts_against_the_budget_on_every_route(server: LiveServer) -> None:
    a, b = server.new_key(10), server.new_key(10)
    with server.client() as c:
        ha = {"x-api-key": a}
        first = c.post(URL, json=SMALL, headers={**ha, "Idempotency-Key": "a-1"})
        assert first.status_code == 200  # its answer is stored: the key's budget is now full
        assert _credits(server, a) == 9

        for path, body in ((URL, SMALL), (GENERATIONS, {"prompt": "a red circle", "size": "256x256"})):
            full = c.post(path, json=body, headers={**ha, "Idempotency-Key": "a-2"})
            assert full.status_code == 429, (path, full.text)
            error = full.json()["error"]
            message = error["message"] if path == GENERATIONS else error  # OpenAI's error shape there
            assert "SD3SERVE_STORAGE_PER_KEY_MB" in message and "without an Idempotency-Key" in message
        v2 = c.post(SUBMIT, json=SMALL, headers=ha)
        assert v2.status_code == 429 and "v1 endpoint without an Idempotency-Key" in v2.json()["error"]
        assert _credits(server, a) == 9  # nothing refused was charged

        # What the message suggests works: no Idempotency-Key on v1 stores nothing; a retry is still replayed.
        assert c.post(URL, json=SMALL, headers=ha).status_code == 200
        replay = c.post(URL, json=SMALL, headers={**ha, "Idempotency-Key": "a-1"})
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
        assert _credits(server, a) == 8

        # Another key's budget is its own.
        hb = {"x-api-key": b, "Idempotency-Key": "a-2"}
        assert c.post(URL, json=SMALL, headers=hb).status_code == 200
        assert _credits(server, b) == 9


# --- the Idempotency-Key covers the webhook, and belongs to one key -------------------------------------------


def test_an_idempotent_v2_retry_must_ask_for_the_same_webhook(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", webhook_allow_private=True)
    gen = run_live_server(settings, engine=StubEngine())
    server = next(gen)
    try:
        a, b = server.new_key(10), server.new_key(10)
        hook = {"webhook_url": "http://127.0.0.1:9/hook", "webhook_events": ["completed", "failed"]}
        with server.client() as c:
            for key in (a, b):
                assert c.post("/v1/webhook-secret", headers={"x-api-key": key}).status_code == 200
            ha = {"x-api-key": a, "Idempotency-Key": "order-1"}
            first = c.post(SUBMIT, json={**SMALL, **hook}, headers=ha)
            assert first.status_code == 200
            task = first.json()["request_id"]

            same = c.post(SUBMIT, json={**SMALL, **hook, "webhook_events": ["failed", "completed"]}, headers=ha)
            assert same.status_code == 200 and same.json()["request_id"] == task  # the same set of events
            for changed in (
                {**hook, "webhook_url": "http://127.0.0.1:9/other"},
                {**hook, "webhook_events": ["completed"]},
                {},  # no webhook at all
            ):
                retry = c.post(SUBMIT, json={**SMALL, **changed}, headers=ha)
                assert retry.status_code == 422, (changed, retry.text)
                assert "another request body" in retry.json()["error"]

            # Key b uses the same Idempotency-Key with another body: its own request, not a's (nor a 422).
            hb = {"x-api-key": b, "Idempotency-Key": "order-1"}
            theirs = c.post(SUBMIT, json={**SMALL, "prompt": "a blue square"}, headers=hb)
            assert theirs.status_code == 200 and theirs.json()["request_id"] != task
            assert "idempotent-replayed" not in theirs.headers
            again = c.post(SUBMIT, json={**SMALL, "prompt": "a blue square"}, headers=hb)
            assert again.json()["request_id"] == theirs.json()["request_id"]
            assert c.post(SUBMIT, json={**SMALL, **hook}, headers=ha).json()["request_id"] == task
            assert c.get(f"/v2/requests/{task}/status", headers={"x-api-key": b}).status_code == 404
        assert (_credits(server, a), _credits(server, b)) == (9, 9)  # each charged once, for its own task
        wait_for(lambda: server.store.get_key(key_id=1).spent == 1 and server.store.get_key(key_id=2).spent == 1)
    finally:
        gen.close()


# --- admin amounts and revoked keys ---------------------------------------------------------------------------


def test_admin_amounts_are_json_numbers(server: LiveServer) -> None:
    admin = {"x-admin-key": ADMIN_KEY}
    with server.client() as c:
        for bad in ("10", "1e3", "", True, None, [1], {"n": 1}):
            for path in ("/admin/keys", "/admin/keys/1/credits"):
                r = c.post(path, json={"credits": bad}, headers=admin)
                assert r.status_code in (400, 404), (path, bad, r.text)
                if r.status_code == 400:
                    assert "credits" in r.json()["error"]
        created = c.post("/admin/keys", json={"credits": 2.5}, headers=admin)
        assert created.status_code == 200 and created.json()["credits"] == 2.5
        key_id = created.json()["id"]
        for bad in ("10", True):
            r = c.post(f"/admin/keys/{key_id}/credits", json={"credits": bad}, headers=admin)
            assert r.status_code == 400 and "JSON number" in r.json()["error"]
        assert c.post(f"/admin/keys/{key_id}/credits", json={"credits": 1}, headers=admin).json()["credits"] == 3.5
        assert [k["credits"] for k in c.get("/admin/keys", headers=admin).json()] == [3.5]


def test_a_revoked_key_is_not_topped_up_and_another_key_is(server: LiveServer) -> None:
    admin = {"x-admin-key": ADMIN_KEY}
    with server.client() as c:
        a = c.post("/admin/keys", json={"credits": 5}, headers=admin).json()
        b = c.post("/admin/keys", json={"credits": 5}, headers=admin).json()
        assert c.post(f"/admin/keys/{a['id']}/revoke", headers=admin).json()["revoked"]
        refused = c.post(f"/admin/keys/{a['id']}/credits", json={"credits": 3}, headers=admin)
        assert refused.status_code == 400 and "revoked" in refused.json()["error"]
        topped = c.post(f"/admin/keys/{b['id']}/credits", json={"credits": 3}, headers=admin)
        assert topped.status_code == 200 and topped.json()["credits"] == 8
        keys = {k["id"]: k for k in c.get("/admin/keys", headers=admin).json()}
        assert (keys[a["id"]]["credits"], keys[a["id"]]["revoked"]) == (5, True)
        assert (keys[b["id"]]["credits"], keys[b["id"]]["revoked"]) == (8, False)


def test_revoking_one_key_keeps_another_keys_queued_tasks(server: LiveServer) -> None:
    a, b = server.new_key(10), server.new_key(10)
    admin = {"x-admin-key": ADMIN_KEY}
    with server.client() as c:
        mine = c.post(SUBMIT, json=SMALL, headers={"x-api-key": b}).json()["request_id"]
        a_id = server.store.authenticate(api_key=a).id
        assert c.post(f"/admin/keys/{a_id}/revoke", headers=admin).status_code == 200
        done = wait_for(lambda: c.get(f"/v2/requests/{mine}/status", headers={"x-api-key": b}).json()["status"]
                        in ("COMPLETED", "FAILED", "CANCELLED") and c.get(f"/v2/requests/{mine}/status",
                        headers={"x-api-key": b}).json())  # fmt: skip
        assert done["status"] == "COMPLETED"
        assert _credits(server, b) == 9


# --- framing ----------------------------------------------------------------------------------------------


def test_the_documentation_pages_cannot_be_framed(server: LiveServer) -> None:
    with server.client() as c:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            r = c.get(path)
            assert r.status_code == 200, path
            assert r.headers["x-frame-options"] == "DENY", path
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
