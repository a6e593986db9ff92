"""The OpenAI-compatible images API, through OpenAI's official Python and Node clients and plain HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from PIL import Image

from live_server import SMALL, URL, LiveServer, run_live_server
from sd3serve.api.openai_schemas import MODEL_ID, SIZES
from sd3serve.engine.job import GenerationJob, GenerationResult
from sd3serve.errors import Overloaded
from sd3serve.settings import Settings
from stub_engine import StubEngine

GENERATIONS = "/v1/images/generations"
SMALLEST = "256x256"  # the tiny model draws it quickly


def client_for(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


def credits(server: LiveServer, key: str) -> float:
    return float(httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key}).json()["credits"])


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


# --- the official Python client ---------------------------------------------------------------------------------


def test_b64_json_batch_equals_v1_images(live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    result = client_for(live_server, key).images.generate(
        model=MODEL_ID, prompt=SMALL["prompt"], n=2, size=SMALLEST, response_format="b64_json",
        output_format="png", extra_body={"seed": 40, "steps": 2},
    )  # fmt: skip
    assert result.created > 0 and len(result.data) == 2
    for i, image in enumerate(result.data):
        assert image.url is None and image.b64_json is not None
        png = base64.b64decode(image.b64_json)
        assert decode(png).format == "PNG" and decode(png).size == (256, 256)
        v1 = httpx.post(f"{live_server.url}{URL}", headers={"x-api-key": key}, timeout=120, json={
            "prompt": SMALL["prompt"], "steps": 2, "seed": 40 + i, "width": 256, "height": 256, "image_format": "png"})
        assert v1.content == png  # the same generation as v1: image i uses seed + i
    assert credits(live_server, key) == 10 - 2 - 2


def test_url_is_a_data_url_with_headers(live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    raw = client_for(live_server, key).images.with_raw_response.generate(
        prompt=SMALL["prompt"], size=SMALLEST, output_format="jpeg", output_compression=50,
        extra_body={"seed": 9, "steps": 2}, user="someone",
    )  # fmt: skip
    assert (raw.headers["x-cost"], raw.headers["x-remaining-credits"], raw.headers["x-seed-value"]) == ("1", "9", "9")
    image = raw.parse().data[0]
    assert image.b64_json is None and image.url is not None and image.url.startswith("data:image/jpeg;base64,")
    with urllib.request.urlopen(image.url) as fetched:  # a data: URL needs no key and no server
        jpeg = fetched.read()
    assert decode(jpeg).format == "JPEG" and decode(jpeg).size == (256, 256)


def test_defaults_png_url_random_seed_and_model_aliases(live_server: LiveServer) -> None:
    key = live_server.new_key(10)
    client = client_for(live_server, key)
    seeds = set()
    for model in (None, "stable-diffusion-3.5-large-turbo", "stabilityai/stable-diffusion-3.5-large-turbo"):
        extra = {} if model is None else {"model": model}
        raw = client.images.with_raw_response.generate(prompt=SMALL["prompt"], size=SMALLEST,
                                                      extra_body={"steps": 2}, **extra)  # fmt: skip
        assert raw.parse().data[0].url.startswith("data:image/png;base64,")  # type: ignore[union-attr]
        seeds.add(raw.headers["x-seed-value"])
    assert len(seeds) == 3  # no seed given: a random one each time, as OpenAI's images differ


def test_bad_size_is_400_listing_the_sizes_and_charges_nothing(live_server: LiveServer) -> None:
    key = live_server.new_key(5)
    with pytest.raises(openai.BadRequestError) as e:
        client_for(live_server, key).images.generate(prompt="a red circle", size="1000x1000")
    assert e.value.status_code == 400 and e.value.param == "size" and e.value.type == "invalid_request_error"
    assert all(size in e.value.message for size in SIZES)
    assert credits(live_server, key) == 5


def test_bad_key_is_401_invalid_api_key(live_server: LiveServer) -> None:
    with pytest.raises(openai.AuthenticationError) as e:
        client_for(live_server, "sk-not-a-key").images.generate(prompt="a red circle", size=SMALLEST)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(live_server, "sk-not-a-key").models.list()


def test_insufficient_credits_is_429_insufficient_quota(live_server: LiveServer) -> None:
    key = live_server.new_key(1)
    with pytest.raises(openai.RateLimitError) as e:
        client_for(live_server, key).images.generate(prompt="a red circle", size=SMALLEST, n=2)
    assert e.value.status_code == 429 and e.value.code == "insufficient_quota" and e.value.type == "insufficient_quota"
    assert credits(live_server, key) == 1


def test_models_list_and_retrieve(live_server: LiveServer) -> None:
    client = client_for(live_server, live_server.new_key(1))
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "stabilityai"
    assert client.models.retrieve("stable-diffusion-3.5-large-turbo").id == MODEL_ID
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("dall-e-3")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(model="dall-e-3", prompt="a red circle")
    assert e.value.code == "model_not_found" and e.value.param == "model"


# --- plain HTTP: keys, bad input, error shapes ------------------------------------------------------------------


@pytest.fixture
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as c:
        yield c


def test_x_api_key_wins_over_bearer(live_server: LiveServer, http: httpx.Client) -> None:
    key = live_server.new_key(3)
    body = {"prompt": "a red circle", "size": SMALLEST, "steps": 2, "response_format": "b64_json"}
    one = http.post(GENERATIONS, json=body, headers={"x-api-key": key})
    assert one.status_code == 200
    [item] = one.json()["data"]
    assert set(item) == {"b64_json"}  # as OpenAI answers: no "url": null, no "revised_prompt": null
    both = http.post(GENERATIONS, json=body, headers={"x-api-key": key, "Authorization": "Bearer sk-other"})
    assert both.status_code == 200
    assert credits(live_server, key) == 1


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [({}, "missing API key"), ({"Authorization": "Basic abc"}, "Bearer"), ({"Authorization": "Bearer"}, "Bearer")],
)
def test_missing_or_malformed_key(http: httpx.Client, headers: dict[str, str], fragment: str) -> None:
    r = http.post(GENERATIONS, json={"prompt": "a red circle"}, headers=headers)
    assert r.status_code == 401
    error = r.json()["error"]
    assert fragment in error["message"] and error["code"] == "invalid_api_key" and error["param"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 11}, "n"),
        ({"prompt": "a", "n": "2"}, "n"),
        ({"prompt": "a", "size": "1024X1024"}, "size"),
        ({"prompt": "a", "size": 1024}, "size"),
        ({"prompt": "a", "response_format": "xml"}, "response_format"),
        ({"prompt": "a", "output_format": "gif"}, "output_format"),
        ({"prompt": "a", "output_compression": 101}, "output_compression"),
        ({"prompt": "a", "user": 7}, "user"),
        ({"prompt": "a", "stream": True}, "stream"),
        ({"prompt": "a", "background": "transparent"}, "background"),
        ({"prompt": "a", "quality": "ultra"}, "quality"),
        ({"prompt": "a", "model": 3}, "model"),
        ({"prompt": "a", "seed": -2}, "seed"),
        ({"prompt": "a", "steps": 0}, "steps"),
        ({"prompt": "a", "sampler": "nope"}, "sampler"),
        ([1, 2], None),
    ],
)
def test_bad_input_is_400_naming_the_param(live_server: LiveServer, http: httpx.Client, body: Any,
                                          param: str | None) -> None:  # fmt: skip
    key = live_server.new_key(5)
    r = http.post(GENERATIONS, json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert param is None or error["message"].startswith(f"{param}:")
    assert credits(live_server, key) == 5


def test_malformed_json_is_400_in_openai_shape(live_server: LiveServer, http: httpx.Client) -> None:
    key = live_server.new_key(1)
    r = http.post(GENERATIONS, content=b"{", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON")


def test_error_shape_is_chosen_by_path(live_server: LiveServer, http: httpx.Client) -> None:
    assert http.get(GENERATIONS).status_code == 405
    assert http.get(GENERATIONS).json()["error"]["type"] == "invalid_request_error"
    assert http.post("/v1/images/variations").json()["error"]["message"].startswith("not found")
    # Every other route keeps the contract's {"error": "..."}.
    bad_key = http.post(URL, json=SMALL, headers={"x-api-key": "sk-nope"})
    assert bad_key.json() == {"error": "invalid or revoked API key"}
    bearer = http.post(URL, json=SMALL, headers={"Authorization": "Bearer x"})  # v1 reads x-api-key only
    assert bearer.json() == {"error": "missing x-api-key header"}
    assert isinstance(http.get("/v1/imagesx").json()["error"], str)


def test_openapi_documents_the_routes(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    post = spec["paths"]["/v1/images/generations"]["post"]
    assert {p["name"] for p in post["parameters"]} >= {"authorization", "x-api-key"}
    assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(post["responses"])
    assert "x-seed-value" in post["responses"]["200"]["headers"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "n", "size", "response_format", "output_format", "seed"} <= set(body["properties"])
    assert body["properties"]["size"]["enum"] == list(SIZES)
    assert "OpenAIErrorResponse" in json.dumps(post["responses"]["429"])
    assert {"/v1/models", "/v1/models/{model}"} <= set(spec["paths"])


# --- rate limits and server failures, on a stub engine ---------------------------------------------------------


class SwitchableEngine(StubEngine):
    mode = "ok"

    def admit(self) -> None:
        if self.mode == "full":
            raise Overloaded("the queue is full; retry later", retry_after_s=3)

    async def generate(self, job: GenerationJob, *, request_id: str, progress: Any = None) -> GenerationResult:
        if self.mode == "fail":
            raise RuntimeError("secret internal detail")
        return await super().generate(job, request_id=request_id, progress=progress)


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[LiveServer, SwitchableEngine]]:
    import tempfile

    engine = SwitchableEngine()
    gen = run_live_server(Settings(data_dir=Path(tempfile.mkdtemp(prefix="sd3openai-")), device="cpu",
                                   rate_limit_per_minute=2), engine=engine)  # fmt: skip
    yield next(gen), engine
    gen.close()


def test_rate_limit_is_429_rate_limit_exceeded(stub: tuple[LiveServer, SwitchableEngine]) -> None:
    server, _ = stub
    client = client_for(server, server.new_key(10))
    for _ in range(2):
        client.images.generate(prompt="a red circle", size=SMALLEST)
    with pytest.raises(openai.RateLimitError) as e:
        client.images.generate(prompt="a red circle", size=SMALLEST)
    assert e.value.code == "rate_limit_exceeded" and int(e.value.response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize(("mode", "status", "code"), [("fail", 500, None), ("full", 503, "overloaded")])
def test_server_errors_charge_nothing(stub: tuple[LiveServer, SwitchableEngine], mode: str, status: int,
                                     code: str | None) -> None:  # fmt: skip
    server, engine = stub
    key = server.new_key(3)
    engine.mode = mode
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client_for(server, key).images.generate(prompt="a red circle", size=SMALLEST)
    finally:
        engine.mode = "ok"
    assert e.value.status_code == status and e.value.type == "server_error" and e.value.code == code
    assert "secret" not in e.value.message
    assert credits(server, key) == 3


# --- the official Node client -----------------------------------------------------------------------------------

NODE_CLIENT = """\
const OpenAI = require('openai');
const [baseURL, key] = process.argv.slice(2);
const client = new OpenAI({ apiKey: key, baseURL: baseURL + '/v1', maxRetries: 0 });
const prompt = 'a red circle on a blue background';

(async () => {
  const out = {};
  const b64 = await client.images.generate({ prompt, size: '256x256', n: 2, response_format: 'b64_json',
                                             output_format: 'png', seed: 3, steps: 2 });
  out.b64 = b64.data.map((d) => Buffer.from(d.b64_json, 'base64').subarray(1, 4).toString());
  const url = await client.images.generate({ prompt, size: '256x256', output_format: 'webp', seed: 3, steps: 2 });
  const bytes = Buffer.from(await (await fetch(url.data[0].url)).arrayBuffer());
  out.url = bytes.subarray(8, 12).toString();
  out.models = (await client.models.list()).data.map((m) => m.id);
  try {
    await client.images.generate({ prompt, size: '1000x1000' });
  } catch (e) {
    out.badSize = { status: e.status, param: e.param, type: e.type };
  }
  try {
    await new OpenAI({ apiKey: 'sk-wrong', baseURL: baseURL + '/v1', maxRetries: 0 }).images.generate({ prompt });
  } catch (e) {
    out.badKey = { status: e.status, code: e.code };
  }
  console.log(JSON.stringify(out));
})();
"""


def test_node_client(live_server: LiveServer, node_modules: Path, tmp_path: Path) -> None:
    key = live_server.new_key(10)
    path = tmp_path / "openai_client.js"
    path.write_text(NODE_CLIENT)
    env = {**os.environ, "NODE_PATH": str(node_modules)}  # require('openai') from tests/js, the script elsewhere
    out = subprocess.run(["node", str(path), live_server.url, key], capture_output=True, timeout=300,
                         cwd=tmp_path, env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "b64": ["PNG", "PNG"],
        "url": "WEBP",
        "models": [MODEL_ID],
        "badSize": {"status": 400, "param": "size", "type": "invalid_request_error"},
        "badKey": {"status": 401, "code": "invalid_api_key"},
    }
    assert credits(live_server, key) == 10 - 3
