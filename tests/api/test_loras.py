"""LoRA adapters over HTTP: GET /v1/loras, the field on v1, v2 and OpenAI's routes (extra_body), unknown names."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import httpx
import openai
import pytest
from PIL import Image

from live_server import SMALL, URL, LiveServer, run_live_server
from sd3serve.engine.loading import LoadedModel
from sd3serve.settings import Settings


@pytest.fixture(scope="module")
def lora_server(tiny_model: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from lora_files import peft_file, random_layers
    from sd3serve.engine.batching import BatchingEngine

    lora_dir = tmp_path_factory.mktemp("loras")
    peft_file(lora_dir / "alpha.safetensors", random_layers(tiny_model, 1))
    peft_file(lora_dir / "beta.safetensors", random_layers(tiny_model, 2))
    settings = Settings(device="cpu", data_dir=tmp_path_factory.mktemp("lora-live"), lora_dir=lora_dir)
    yield from run_live_server(settings, engine=BatchingEngine(settings, model=tiny_model))


def credits(server: LiveServer, key: str) -> float:
    return float(httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key}).json()["credits"])


def v1(server: LiveServer, key: str, **extra: object) -> httpx.Response:
    body = {**SMALL, "seed": 4, "image_format": "png", **extra}
    return httpx.post(f"{server.url}{URL}", json=body, headers={"x-api-key": key}, timeout=120)


def test_the_list(lora_server: LiveServer) -> None:
    key = lora_server.new_key(1)
    r = httpx.get(f"{lora_server.url}/v1/loras", headers={"x-api-key": key})
    assert r.status_code == 200
    body = r.json()
    assert [x["name"] for x in body["loras"]] == ["alpha", "beta"] and body["max_per_request"] == 4
    assert httpx.get(f"{lora_server.url}/v1/loras").status_code == 401


def test_v1_with_an_adapter_differs_and_without_is_unchanged(lora_server: LiveServer) -> None:
    key = lora_server.new_key(5)
    base = v1(lora_server, key)
    adapted = v1(lora_server, key, loras=[{"name": "alpha", "scale": 1.0}])
    assert base.status_code == adapted.status_code == 200
    assert base.content != adapted.content
    assert v1(lora_server, key).content == base.content
    assert v1(lora_server, key, loras=[{"name": "alpha"}]).content == adapted.content  # scale defaults to 1


@pytest.mark.parametrize(
    ("loras", "message"),
    [
        ([{"name": "gamma"}], "unknown adapter 'gamma'; this server has: alpha, beta"),
        ([{"name": "alpha"}, {"name": "alpha"}], "each adapter may be named once"),
        ([{"name": f"a{i}"} for i in range(5)], "at most 4"),
        ([{"name": "../etc/passwd"}], "loras.0.name"),
        ([{"name": "alpha", "scale": 5}], "loras.0.scale"),
        ([{"name": "alpha", "extra": 1}], "loras.0.extra"),
    ],
)
def test_bad_adapters_are_400s_and_cost_nothing(lora_server: LiveServer, loras: object, message: str) -> None:
    key = lora_server.new_key(1)
    r = v1(lora_server, key, loras=loras)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert credits(lora_server, key) == 1


def test_four_adapters_at_once(lora_server: LiveServer) -> None:
    key = lora_server.new_key(1)
    r = v1(lora_server, key, loras=[{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": -0.5}])
    assert r.status_code == 200


def test_v2_with_an_adapter_is_v1s_picture(lora_server: LiveServer) -> None:
    key = lora_server.new_key(3)
    h = {"x-api-key": key}
    body = {**SMALL, "seed": 4, "image_format": "png", "loras": [{"name": "beta", "scale": 0.8}]}
    task = httpx.post(f"{lora_server.url}/v2/stable-diffusion-3.5-turbo-txt2img", json=body, headers=h).json()
    with httpx.Client(timeout=60) as c:
        from waiting import wait_for

        wait_for(lambda: c.get(task["status_url"], headers=h).json()["status"] == "COMPLETED")
        url = c.get(task["response_url"], headers=h).json()["output"][0]
        assert c.get(url, headers=h).content == v1(lora_server, key, loras=body["loras"]).content


def test_openai_generate_and_edit_with_adapters_through_extra_body(lora_server: LiveServer) -> None:
    key = lora_server.new_key(6)
    client = openai.OpenAI(api_key=key, base_url=f"{lora_server.url}/v1", max_retries=0, timeout=120)
    loras = [{"name": "alpha", "scale": 1.0}]
    result = client.images.generate(prompt=str(SMALL["prompt"]), size="256x256", response_format="b64_json",
                                    extra_body={"seed": 4, "steps": 2, "loras": loras})  # fmt: skip
    got = base64.b64decode(result.data[0].b64_json or "")
    same = v1(lora_server, key, width=256, height=256, loras=loras)
    assert got == same.content
    plain = v1(lora_server, key, width=256, height=256)
    assert got != plain.content
    buf = io.BytesIO()
    Image.open(io.BytesIO(plain.content)).save(buf, format="PNG")
    edit = lambda extra: client.images.edit(  # noqa: E731
        image=("x.png", buf.getvalue(), "image/png"), prompt=str(SMALL["prompt"]), response_format="b64_json",
        extra_body={"seed": 4, "steps": 2, "strength": 0.5, **extra},
    )
    with_adapter = edit({"loras": loras}).data[0].b64_json
    without = edit({}).data[0].b64_json
    assert with_adapter != without
    with pytest.raises(openai.BadRequestError) as e:
        edit({"loras": [{"name": "gamma"}]})
    assert "alpha, beta" in str(e.value)
