"""The admin API as docs/keys.md describes it, through HTTP: `POST /admin/keys {"credits", "name"}` answers the key
once and its account, `GET /admin/keys` lists every key with its name, credits, spending and state, credits added
to one key change only that key, a revoked key is refused (401) from its next request on, and a key's webhook
secret (`POST /v1/webhook-secret`) is its own and replaced at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from live_server import LiveServer, serving
from sd3serve.api.connections import uvicorn_options
from sd3serve.settings import Settings
from stub_engine import StubEngine

ADMIN = {"x-admin-key": "adm-" + "Vb7Xr2Lq9TzK4pWm6Hc1Ns8Dj3Fy5GuR"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path, device="cpu", admin_key=ADMIN["x-admin-key"])
    with serving(settings, engine=StubEngine(), options=uvicorn_options(settings)) as s:
        yield s


def test_a_new_key_is_shown_once_with_its_name_and_credits(server: LiveServer) -> None:
    with server.client() as c:
        alice = c.post("/admin/keys", json={"credits": 12.5, "name": "alice"}, headers=ADMIN)
        bob = c.post("/admin/keys", json={"credits": 3, "name": "bob"}, headers=ADMIN)
        assert alice.status_code == bob.status_code == 200
        a, b = alice.json(), bob.json()
        assert (a["name"], a["credits"], b["name"], b["credits"]) == ("alice", 12.5, "bob", 3)
        assert a["key"].startswith("sk-") and a["key"] != b["key"] and a["id"] != b["id"]
        listed = c.get("/admin/keys", headers=ADMIN).json()
        assert [(k["id"], k["name"], k["credits"]) for k in listed] == [(a["id"], "alice", 12.5), (b["id"], "bob", 3)]
        assert all("key" not in k for k in listed)  # shown once, at creation
        assert [k["prefix"] for k in listed] == [a["key"][:10], b["key"][:10]]
        assert [(k["spent"], k["revoked"]) for k in listed] == [(0, False), (0, False)]
        assert c.get("/v1/get-user-credits", headers={"x-api-key": a["key"]}).json() == {"credits": 12.5}
        assert c.get("/v1/get-user-credits", headers={"x-api-key": b["key"]}).json() == {"credits": 3}


def test_credits_added_to_one_key_leave_the_other_alone(server: LiveServer) -> None:
    with server.client() as c:
        a = c.post("/admin/keys", json={"credits": 1, "name": "a"}, headers=ADMIN).json()
        b = c.post("/admin/keys", json={"credits": 1, "name": "b"}, headers=ADMIN).json()
        added = c.post(f"/admin/keys/{a['id']}/credits", json={"credits": 2.25}, headers=ADMIN)
        assert added.status_code == 200 and added.json()["credits"] == 3.25 and added.json()["name"] == "a"
        assert c.get("/v1/get-user-credits", headers={"x-api-key": a["key"]}).json() == {"credits": 3.25}
        assert c.get("/v1/get-user-credits", headers={"x-api-key": b["key"]}).json() == {"credits": 1}
        assert c.post("/admin/keys/999/credits", json={"credits": 1}, headers=ADMIN).status_code == 404


def test_revoking_one_key_refuses_it_and_not_the_other(server: LiveServer) -> None:
    with server.client() as c:
        a = c.post("/admin/keys", json={"credits": 5, "name": "a"}, headers=ADMIN).json()
        b = c.post("/admin/keys", json={"credits": 5, "name": "b"}, headers=ADMIN).json()
        revoked = c.post(f"/admin/keys/{a['id']}/revoke", headers=ADMIN)
        assert revoked.status_code == 200 and revoked.json()["id"] == a["id"]
        assert c.get("/v1/get-user-credits", headers={"x-api-key": a["key"]}).status_code == 401
        assert c.get("/v1/get-user-credits", headers={"x-api-key": b["key"]}).status_code == 200
        listed = {k["id"]: k for k in c.get("/admin/keys", headers=ADMIN).json()}
        assert (listed[a["id"]]["revoked"], listed[b["id"]]["revoked"]) == (True, False)
        assert revoked.json()["revoked"] is True
        assert c.post(f"/admin/keys/{a['id']}/credits", json={"credits": 1}, headers=ADMIN).status_code == 400
        assert c.post("/admin/keys/999/revoke", headers=ADMIN).status_code == 404


def test_each_key_has_its_own_webhook_secret_replaced_at_once(server: LiveServer) -> None:
    with server.client() as c:
        a = c.post("/admin/keys", json={"credits": 5, "name": "a"}, headers=ADMIN).json()["key"]
        b = c.post("/admin/keys", json={"credits": 5, "name": "b"}, headers=ADMIN).json()["key"]
        first = c.post("/v1/webhook-secret", headers={"x-api-key": a})
        other = c.post("/v1/webhook-secret", headers={"x-api-key": b})
        again = c.post("/v1/webhook-secret", headers={"x-api-key": a})
        assert first.status_code == other.status_code == again.status_code == 200
        secrets = [r.json()["secret"] for r in (first, other, again)]
        assert len(set(secrets)) == 3 and all(s.startswith("whsec_") for s in secrets)
        assert c.post("/v1/webhook-secret").status_code == 401
