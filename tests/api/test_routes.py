"""The v1 API through the real stack: a live uvicorn server with a tiny model."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from live_server import SMALL, URL, LiveServer, serving
from sd3serve.settings import Settings
from stub_engine import FailingEngine

GEN_HEADERS = ("x-remaining-credits", "x-cost", "x-generation-time", "x-seed-value", "x-request-id")


@pytest.fixture
def client(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c


@pytest.fixture
def key(live_server: LiveServer) -> str:
    return live_server.new_key(100)


def post(client: httpx.Client, key: str, body: Any, **kw: Any) -> httpx.Response:
    return client.post(URL, json=body, headers={"x-api-key": key}, **kw)


def test_image_bytes_and_headers(client: httpx.Client, key: str) -> None:
    r = post(client, key, {**SMALL, "width": 96, "height": 80})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/jpeg"
    assert all(h in r.headers for h in GEN_HEADERS)
    assert (r.headers["x-cost"], r.headers["x-remaining-credits"], r.headers["x-seed-value"]) == ("1", "99", "98552302")
    assert float(r.headers["x-generation-time"]) > 0
    assert Image.open(io.BytesIO(r.content)).size == (96, 80)


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_formats(client: httpx.Client, key: str, fmt: str, pil: str) -> None:
    r = post(client, key, {**SMALL, "image_format": fmt, "image_quality": 50})
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{fmt}"
    assert Image.open(io.BytesIO(r.content)).format == pil


def test_image_quality_changes_jpeg_size(client: httpx.Client, key: str) -> None:
    sizes = [
        len(post(client, key, {**SMALL, "width": 256, "height": 256, "image_quality": q}).content) for q in (10, 100)
    ]
    assert sizes[0] < sizes[1]


def test_same_seed_same_bytes_and_seed_minus_one(client: httpx.Client, key: str) -> None:
    a, b = (post(client, key, {**SMALL, "seed": 7}).content for _ in range(2))
    assert a == b
    c = post(client, key, {**SMALL, "seed": 8}).content
    assert c != a
    r = post(client, key, {**SMALL, "seed": -1})
    assert 0 <= int(r.headers["x-seed-value"]) < 2**32


def test_base64_batch_equals_single_requests(client: httpx.Client, key: str) -> None:
    r = post(client, key, {**SMALL, "seed": 100, "batch_size": 3, "base64": True, "image_format": "png"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["seed"] == 100 and body["image"] == body["images"][0] and len(body["images"]) == 3
    assert r.headers["x-cost"] == "3"
    for i, b64 in enumerate(body["images"]):
        single = post(client, key, {**SMALL, "seed": 100 + i, "image_format": "png"})
        assert base64.b64decode(b64) == single.content, f"image {i} differs from seed {100 + i} alone"


def test_credits_endpoint(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 5}
    post(client, key, {**SMALL, "batch_size": 2, "base64": True})
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "sk-unknown"}])
def test_401(client: httpx.Client, headers: dict[str, str]) -> None:
    for r in (client.post(URL, json=SMALL, headers=headers), client.get("/v1/get-user-credits", headers=headers)):
        assert r.status_code == 401 and "error" in r.json()


def test_revoked_key_401(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    live_server.store.revoke(key_id=live_server.store.authenticate(api_key=key).id)
    assert post(client, key, SMALL).status_code == 401


def test_406_charges_nothing(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(2)
    r = post(client, key, {**SMALL, "batch_size": 3, "base64": True})
    assert r.status_code == 406 and "credits" in r.json()["error"]
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 2}


def test_400_names_field_and_charges_nothing(client: httpx.Client, live_server: LiveServer) -> None:
    key = live_server.new_key(3)
    r = post(client, key, {**SMALL, "steps": 99})
    assert r.status_code == 400 and r.json()["error"].startswith("steps:")
    r = post(client, key, {**SMALL, "batch_size": 2})
    assert r.status_code == 400 and "base64" in r.json()["error"]
    r = client.post(URL, content=b"{not json", headers={"x-api-key": key, "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = client.post(URL, content=b'{"prompt": "x", "guidance_scale": NaN}', headers={"x-api-key": key})
    assert r.status_code == 400
    r = client.post(URL, content=b"", headers={"x-api-key": key})
    assert r.status_code == 400
    assert client.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}


def test_unknown_fields_ignored(client: httpx.Client, key: str) -> None:
    assert post(client, key, {**SMALL, "style": "anime", "extra": {"a": [1]}}).status_code == 200


def test_404_405_413(client: httpx.Client, key: str) -> None:
    r = client.post("/v1/stable-diffusion-xl-txt2img", json=SMALL, headers={"x-api-key": key})
    assert r.status_code == 404 and "error" in r.json()
    assert client.get("/nope").status_code == 404
    r = client.get(URL, headers={"x-api-key": key})
    assert r.status_code == 405 and "error" in r.json()
    r = client.put("/v1/get-user-credits", headers={"x-api-key": key})
    assert r.status_code == 405
    huge = json.dumps({**SMALL, "prompt": "x" * 70_000})
    r = client.post(URL, content=huge, headers={"x-api-key": key, "content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is checked while reading
        yield huge.encode()

    r = client.post(URL, content=chunked(), headers={"x-api-key": key})
    assert r.status_code == 413


def test_request_id_on_every_response(client: httpx.Client) -> None:
    ids = {client.get("/healthz").headers["x-request-id"], client.get("/nope").headers["x-request-id"]}
    assert len(ids) == 2


def test_ops_endpoints(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    spec = client.get("/openapi.json").json()
    body = spec["paths"][URL]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/Txt2ImgRequestV1"}
    assert spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]["sampler"]
    assert client.get("/docs").status_code == 200


def test_concurrent_requests_never_overdraw(client: httpx.Client, live_server: LiveServer) -> None:
    """24 requests at once at a key that affords 9 of them: exactly 9 succeed and 9 credits are spent."""
    key = live_server.new_key(9)

    def one(_: int) -> int:
        with live_server.client() as c:
            return post(c, key, {**SMALL, "steps": 1}).status_code

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(24)))
    assert sorted(set(codes)) == [200, 406]
    info = live_server.store.get_key(key_id=live_server.store.authenticate(api_key=key).id)
    assert codes.count(200) * 1 == info.spent == 9
    assert info.credits == 0


def test_500_is_json_and_charges_nothing(tmp_path: Path) -> None:
    with serving(Settings(data_dir=tmp_path, device="cpu"), engine=FailingEngine()) as server:
        key = server.new_key(3)
        with server.client() as c:
            r = post(c, key, SMALL)
            assert r.status_code == 500
            assert r.json() == {"error": "image generation failed; nothing was charged"}
            assert "secret" not in r.text and "Traceback" not in r.text
            assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}
