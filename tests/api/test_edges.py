"""Every limit of the contract at its edge and one past it, through a live server (a stub engine: no model)."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from helpers.two_keys import V1, V2, credits, h, status
from live_server import SMALL, LiveServer, run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine
from waiting import wait_for

LIMIT = 4096  # SD3SERVE_MAX_BODY_BYTES for these tests


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("edges"), device="cpu", max_body_bytes=LIMIT)
    gen = run_live_server(settings, engine=StubEngine())
    yield next(gen)
    gen.close()


def body_of(size: int, **fields: object) -> bytes:
    """A valid JSON request of exactly ``size`` bytes (padded with trailing whitespace, which JSON allows)."""
    raw = json.dumps({**SMALL, **fields}).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


@pytest.mark.parametrize("path", [V1, V2, "/v1/images/generations"])
@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_body_of_exactly_the_limit_is_accepted_and_one_byte_more_is_413(
    server: LiveServer, path: str, chunked: bool
) -> None:
    key = server.new_key(5)
    fields = {"size": "256x256", "response_format": "b64_json"} if path.startswith("/v1/images") else {}
    if fields:
        fields = {"prompt": SMALL["prompt"], **fields}

    def send(size: int) -> int:
        if fields:
            raw = json.dumps(fields).encode()
            content = raw + b" " * (size - len(raw))
        else:
            content = body_of(size)
        assert len(content) == size
        data: bytes | Iterator[bytes] = iter([content[: size // 2], content[size // 2 :]]) if chunked else content
        with server.client() as c:
            return c.post(path, content=data, headers=h(key, **{"content-type": "application/json"})).status_code

    assert send(LIMIT) == 200
    assert send(LIMIT + 1) == 413


@pytest.mark.parametrize(("size", "width", "height"), [("1536x1024", 1536, 1024), ("1024x1536", 1024, 1536),
                                                      ("1792x1024", 1792, 1024), ("256x256", 256, 256)])  # fmt: skip
def test_openai_sizes_are_width_by_height(server: LiveServer, size: str, width: int, height: int) -> None:
    key = server.new_key(5)
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a box", "size": size, "response_format": "b64_json"},
                   headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
        assert image.size == (width, height)  # PIL's size is (width, height)


def test_v1_width_and_height_are_not_swapped(server: LiveServer) -> None:
    key = server.new_key(5)
    with server.client() as c:
        r = c.post(V1, json={**SMALL, "width": 128, "height": 64, "base64": True}, headers=h(key))
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        assert image.size == (128, 64)


@pytest.mark.parametrize(("field", "edge", "past"), [
    ("batch_size", 10, 11), ("batch_size", 1, 0), ("width", 2048, 2049), ("width", 64, 63),
    ("height", 2048, 2049), ("height", 64, 63), ("steps", 70, 71), ("steps", 1, 0),
])  # fmt: skip
def test_request_limits_through_http(server: LiveServer, field: str, edge: int, past: int) -> None:
    key = server.new_key(20)
    base = {**SMALL, "steps": 1}
    with server.client() as c:
        # v2: accepted at the edge (the stub answers at once), refused one past it, and the refusal is free.
        ok = c.post(V2, json={**base, field: edge}, headers=h(key))
        assert ok.status_code == 200, ok.text
        wait_for(lambda: status(c, key, ok.json()["request_id"]) == "COMPLETED")
        before = credits(c, key)
        r = c.post(V2, json={**base, field: past}, headers=h(key))
        assert r.status_code == 400 and field in r.json()["error"], r.text
        assert credits(c, key) == before


@pytest.mark.parametrize(("n", "code"), [(10, 200), (11, 400)])
def test_openai_n_edge(server: LiveServer, n: int, code: int) -> None:
    key = server.new_key(20)
    with server.client() as c:
        r = c.post("/v1/images/generations", json={"prompt": "a box", "size": "256x256", "n": n,
                                                   "response_format": "b64_json"},
                   headers={"authorization": f"Bearer {key}"})  # fmt: skip
        assert r.status_code == code, r.text
        assert credits(c, key) == 20 - (n if code == 200 else 0)


@pytest.mark.parametrize(("length", "code"), [(255, 200), (256, 400)])
def test_idempotency_key_length_edge(server: LiveServer, length: int, code: int) -> None:
    key = server.new_key(5)
    with server.client() as c:
        r = c.post(V2, json=SMALL, headers=h(key, **{"Idempotency-Key": "k" * length}))
        assert r.status_code == code, r.text


@pytest.mark.parametrize(("length", "code"), [(64, 404), (65, 400)])
def test_task_id_length_edge(server: LiveServer, length: int, code: int) -> None:
    key = server.new_key(1)
    with server.client() as c:
        assert c.get(f"/v2/requests/{'t' * length}/status", headers=h(key)).status_code == code


@pytest.mark.parametrize(("index", "code"), [(9, 404), (10, 400)])  # 0..9 are image indexes of a batch of 10
def test_image_index_path_edge(server: LiveServer, index: int, code: int) -> None:
    key = server.new_key(1)
    with server.client() as c:
        assert c.get(f"/v2/requests/nosuch/images/{index}", headers=h(key)).status_code == code


def test_a_key_with_exactly_the_price_can_pay_and_then_cannot(server: LiveServer) -> None:
    key = server.new_key(2)
    with server.client() as c:
        assert c.post(V1, json={**SMALL, "batch_size": 2, "base64": True}, headers=h(key)).status_code == 200
        assert credits(c, key) == 0
        assert c.post(V1, json=SMALL, headers=h(key)).status_code == 406


def test_the_admin_credit_edges(tmp_path: Path) -> None:
    from sd3serve.service.amounts import MAX_CREDITS_PER_CALL

    admin = "adm-" + "Kq8ZpR3vT6wYb1NcF5hJ9mXs2LdG7uEa"
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu", admin_key=admin), engine=StubEngine())
    server = next(gen)
    try:
        with server.client() as c:
            hdr = {"x-admin-key": admin}
            assert c.post("/admin/keys", json={"credits": int(MAX_CREDITS_PER_CALL)}, headers=hdr).status_code == 200
            past = int(MAX_CREDITS_PER_CALL) + 1
            assert c.post("/admin/keys", json={"credits": past}, headers=hdr).status_code == 400
            assert c.post("/admin/keys", json={"credits": 0}, headers=hdr).status_code == 200
            assert c.post("/admin/keys", json={"credits": 1, "name": "n" * 200}, headers=hdr).status_code == 200
            assert c.post("/admin/keys", json={"credits": 1, "name": "n" * 201}, headers=hdr).status_code == 400
    finally:
        gen.close()
