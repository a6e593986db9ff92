"""Keys, the admin API, rate limits and hostile input, through a live server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from live_server import SMALL, URL, LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine

ADMIN_KEY = "adm-" + "Kq8ZpR3vT6wYb1NcF5hJ9mXs2LdG7uEa"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path, device="cpu", admin_key=ADMIN_KEY, rate_limit_per_minute=3)
    gen = run_live_server(settings, engine=StubEngine())
    yield next(gen)
    gen.close()


def test_weak_admin_keys_are_refused_at_start() -> None:
    for weak in ("short", "a" * 40, "abababababababababababababababababab"):
        with pytest.raises(ValidationError, match="too weak"):
            Settings(admin_key=weak)
    assert Settings(admin_key="").admin_key is None


def test_admin_api(server: LiveServer) -> None:
    with server.client() as c:
        assert c.get("/admin/keys").status_code == 403
        assert c.get("/admin/keys", headers={"x-admin-key": ADMIN_KEY[:-1] + "x"}).status_code == 403
        admin = {"x-admin-key": ADMIN_KEY}
        created = c.post("/admin/keys", json={"credits": 2, "name": "team"}, headers=admin).json()
        key = created.pop("key")
        assert created["credits"] == 2 and created["prefix"] == key[:10]
        assert key not in c.get("/admin/keys", headers=admin).text
        assert c.post(f"/admin/keys/{created['id']}/credits", json={"credits": 3}, headers=admin).json()["credits"] == 5
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 5}
        assert c.post(f"/admin/keys/{created['id']}/revoke", headers=admin).json()["revoked"]
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).status_code == 401
        assert c.post("/admin/keys/999/revoke", headers=admin).status_code == 404
        assert c.post("/admin/keys", json={"credits": -1}, headers=admin).status_code == 400


def test_admin_api_is_off_without_admin_key(live_server: LiveServer) -> None:
    with live_server.client() as c:
        r = c.get("/admin/keys", headers={"x-admin-key": ADMIN_KEY})
        assert r.status_code == 404 and "disabled" in r.json()["error"]


def test_revocation_applies_in_every_process(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu")
    gen_a, gen_b = run_live_server(settings, engine=StubEngine()), run_live_server(settings, engine=StubEngine())
    a, b = next(gen_a), next(gen_b)
    try:
        key = a.new_key(10)
        with b.client() as cb:
            assert cb.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
            a.store.revoke(key_id=a.store.authenticate(api_key=key).id)
            assert cb.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 401
    finally:
        gen_a.close()
        gen_b.close()


def test_rate_limit_429_with_headers(server: LiveServer) -> None:
    key = server.new_key(100)
    with server.client() as c:
        codes = [c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code for _ in range(3)]
        assert codes == [200, 200, 200]
        r = c.post(URL, json=SMALL, headers={"x-api-key": key})
        assert r.status_code == 429 and "rate limit" in r.json()["error"]
        assert r.headers["x-rate-limit-reset-at-utc"].endswith("Z") and 1 <= int(r.headers["retry-after"]) <= 60
        # Polling is not limited, and another key has its own budget.
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).status_code == 200
        assert c.post(URL, json=SMALL, headers={"x-api-key": server.new_key(5)}).status_code == 200
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 97}


def test_rate_limit_is_shared_by_processes(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, device="cpu", rate_limit_per_minute=2)
    gen_a, gen_b = run_live_server(settings, engine=StubEngine()), run_live_server(settings, engine=StubEngine())
    a, b = next(gen_a), next(gen_b)
    try:
        key = a.new_key(10)
        with a.client() as ca, b.client() as cb:
            assert ca.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
            assert cb.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
            assert ca.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 429
            assert cb.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 429
    finally:
        gen_a.close()
        gen_b.close()


HOSTILE: list[tuple[str, bytes, dict[str, str]]] = [
    ("deep JSON", b"[" * 100_000 + b"]" * 100_000, {}),
    ("deep object", b'{"prompt": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}", {}),
    ("NaN", b'{"prompt": "x", "guidance_scale": NaN}', {}),
    ("Infinity", b'{"prompt": "x", "guidance_scale": Infinity}', {}),
    ("huge integer", b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", {}),
    ("huge exponent", b'{"prompt": "x", "steps": 1e999}', {}),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', {}),
    ("lone surrogate", b'{"prompt": "a\\ud800b"}', {}),
    ("array body", b"[1, 2]", {}),
    ("string body", b'"prompt"', {}),
    ("form body", b"prompt=cat", {"content-type": "application/x-www-form-urlencoded"}),
    ("xml body", b"<prompt>cat</prompt>", {"content-type": "application/xml"}),
    ("prompt of 10001 characters", json.dumps({"prompt": "x" * 10001}).encode(), {}),
    ("bool for int", b'{"prompt": "x", "steps": true}', {}),
    ("string for int", b'{"prompt": "x", "steps": "4"}', {}),
]


@pytest.mark.parametrize(("name", "body", "headers"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_input_is_a_clear_4xx(server: LiveServer, name: str, body: bytes, headers: dict[str, str]) -> None:
    key = server.new_key(5)
    with server.client() as c:
        r = c.post(URL, content=body, headers={"x-api-key": key, **headers})
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:200])
        assert r.json()["error"]
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 5}


def test_unicode_prompts_and_10000_characters_work(server: LiveServer) -> None:
    with server.client() as c:
        for prompt in ("日本語のプロンプト 🐼", "\u200b\u202e zero width and RTL", "x" * 10000, "NUL\u0000inside"):
            key = server.new_key(1)  # the fixture's rate limit is 3 a minute
            assert c.post(URL, json={**SMALL, "prompt": prompt}, headers={"x-api-key": key}).status_code == 200


def test_long_prompt_is_truncated_and_said_so(live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    with live_server.client() as c:
        short = c.post(URL, json=SMALL, headers={"x-api-key": key})
        assert "x-prompt-truncated" not in short.headers
        long = c.post(URL, json={**SMALL, "prompt": "a red circle " * 200}, headers={"x-api-key": key})
        assert long.status_code == 200 and long.headers["x-prompt-truncated"] == "true"
