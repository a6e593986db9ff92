"""Image-to-image over HTTP (v1, v2, the Segmind SDK, OpenAI's edits) with the demo model, and hostile images."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from live_server import URL, LiveServer, run_live_server
from sd3demo.judge import judge
from sd3demo.world import Scene, render
from sd3serve.settings import Settings
from waiting import wait_for

I2I = "/v1/stable-diffusion-3.5-turbo-img2img"
I2I_V2 = "/v2/stable-diffusion-3.5-turbo-img2img"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from sd3serve.engine.batching import BatchingEngine

    settings = Settings(device="cpu", data_dir=tmp_path_factory.mktemp("i2i"))
    yield from run_live_server(settings, engine=BatchingEngine(settings))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


RED_TOP_LEFT = render(Scene("red", "circle", "green", position="top left"), 256)


def credits(server: LiveServer, key: str) -> float:
    return float(httpx.get(f"{server.url}/v1/get-user-credits", headers={"x-api-key": key}).json()["credits"])


def post(server: LiveServer, key: str, body: dict[str, object], path: str = I2I) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers={"x-api-key": key}, timeout=120)


def test_a_red_circle_becomes_a_blue_circle_in_the_same_place(demo_server: LiveServer) -> None:
    key = demo_server.new_key(10)
    body = {"prompt": "a blue circle at the top left on a green background", "image": b64(png(RED_TOP_LEFT)),
            "strength": 0.8, "seed": 0, "image_format": "png"}  # fmt: skip
    r = post(demo_server, key, body)
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.size == (256, 256)  # the image's size
    v = judge(out)
    assert (v.colour, v.shape, v.position, v.background) == ("blue", "circle", "top left", "green")
    assert r.headers["x-cost"] == "1" and credits(demo_server, key) == 9


def test_strength_zero_returns_the_input_and_costs_nothing(demo_server: LiveServer) -> None:
    key = demo_server.new_key(1)
    r = post(demo_server, key, {"prompt": "a blue square", "image": b64(png(RED_TOP_LEFT)), "strength": 0,
                                "image_format": "jpeg", "image_quality": 95})  # fmt: skip
    assert r.status_code == 200, r.text
    out = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"), dtype=float)
    diff = np.abs(out - np.asarray(RED_TOP_LEFT.convert("RGB"), dtype=float))
    assert diff.mean() < 8 and np.percentile(diff, 90) < 16  # the VAE's round trip and JPEG's error
    v = judge(Image.open(io.BytesIO(r.content)))
    assert (v.colour, v.shape, v.position, v.background) == ("red", "circle", "top left", "green")
    assert r.headers["x-cost"] == "0" and credits(demo_server, key) == 1


def test_the_output_size_follows_the_image_unless_given(demo_server: LiveServer) -> None:
    key = demo_server.new_key(10)
    image = b64(png(render(Scene("red", "square", "white"), 300, 200)))
    sizes = {
        (): (288, 192),  # rounded down to a multiple of 16
        (("width", 128),): (128, 80),  # the other side follows the aspect ratio (85 -> 80)
        (("width", 96), ("height", 160)): (96, 160),
        (("aspect_ratio", "21:9"),): (1536, 640),
    }
    for extra, size in sizes.items():
        r = post(demo_server, key, {"prompt": "a red square", "image": image, "steps": 1, **dict(extra)})
        assert r.status_code == 200, r.text
        assert Image.open(io.BytesIO(r.content)).size == size


def test_a_large_image_is_scaled_into_the_limits(demo_server: LiveServer) -> None:
    key = demo_server.new_key(1)
    image = b64(png(Image.new("RGB", (4096, 128), "white")))
    r = post(demo_server, key, {"prompt": "a red circle", "image": image, "steps": 1, "strength": 0.5})
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (2048, 64)


def test_v2_twin_runs_and_is_charged_once(demo_server: LiveServer) -> None:
    key = demo_server.new_key(5)
    h = {"x-api-key": key}
    body = {"prompt": "a blue circle at the top left on a green background", "image": b64(png(RED_TOP_LEFT)),
            "strength": 0.8, "seed": 0, "image_format": "png", "batch_size": 2}  # fmt: skip
    r = post(demo_server, key, body, path=I2I_V2)
    assert r.status_code == 200, r.text
    assert r.headers["x-cost"] == "2"
    task = r.json()
    with httpx.Client(timeout=60) as c:
        wait_for(lambda: c.get(task["status_url"], headers=h).json()["status"] == "COMPLETED")
        result = c.get(task["response_url"], headers=h).json()
        first = c.get(result["output"][0], headers=h).content
    sync = post(demo_server, key, {**body, "batch_size": 1})
    assert sync.content == first  # the same generation as v1
    assert credits(demo_server, key) == 5 - 2 - 1


def test_batched_with_company_only_with_the_same_image_and_the_same_picture(demo_server: LiveServer) -> None:
    key = demo_server.new_key(10)
    body = {"prompt": "a blue circle", "image": b64(png(RED_TOP_LEFT)), "strength": 0.5, "seed": 3, "base64": True,
            "batch_size": 2}  # fmt: skip
    pair = post(demo_server, key, body).json()["images"]
    second = post(demo_server, key, {**body, "seed": 4, "batch_size": 1}).json()["images"][0]
    assert pair[1] == second  # image i of a batch is the single request with seed + i


def test_the_same_seed_is_the_same_noise_as_txt2img(demo_server: LiveServer) -> None:
    """At strength 1 the picture is txt2img's: x = ε, whatever the image."""
    key = demo_server.new_key(4)
    common = {"prompt": "a red circle", "seed": 11, "width": 256, "height": 256, "image_format": "png"}
    txt = httpx.post(f"{demo_server.url}{URL}", json=common, headers={"x-api-key": key}, timeout=120)
    img = post(demo_server, key, {**common, "image": b64(png(RED_TOP_LEFT)), "strength": 1.0})
    assert txt.status_code == img.status_code == 200
    assert txt.content == img.content


def test_a_body_with_an_image_may_be_larger_than_the_text_limit(demo_server: LiveServer) -> None:
    key = demo_server.new_key(2)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))
    data = png(noise)
    assert len(data) > demo_server.settings.max_body_bytes
    r = post(demo_server, key, {"prompt": "a red circle", "image": b64(data), "steps": 1})
    assert r.status_code == 200, r.text
    big = httpx.post(f"{demo_server.url}{URL}", json={"prompt": "x" * 100, "pad": b64(data)},
                     headers={"x-api-key": key}, timeout=60)  # fmt: skip
    assert big.status_code == 413  # txt2img keeps its limit


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with one tiny compressed row-set (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * min(height, 64), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _bomb() -> bytes:
    """A 1-bit PNG of 20000 x 20000 (400 M pixels) that compresses to a few hundred KB."""
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


HOSTILE: dict[str, tuple[object, str]] = {
    "truncated": (b64(png(RED_TOP_LEFT)[:300]), "truncated or corrupt"),
    "huge dimensions": (b64(_png_header_only(100_000, 100_000)), "too many pixels"),
    "one huge side": (b64(_png_header_only(9000, 8)), "9000x8, too many pixels"),
    "over the pixel limit": (b64(_png_header_only(4097, 4096)), "4097x4096, too many pixels"),
    "decompression bomb": (b64(_bomb()), "too many pixels"),
    "wrong type (GIF)": ("R0lGODlhAQABAIAAAP///wAAACwAAAAAAQABAAACAkQBADs=", "not a PNG, JPEG or WebP"),
    "wrong type (text)": (b64(b"hello, this is not an image"), "not a PNG, JPEG or WebP"),
    "not base64": ("this is !!! not base64", "not valid base64"),
    "loopback URL": ("http://127.0.0.1:9/image.png", "not a public address"),
    "metadata URL": ("http://169.254.169.254/latest/meta-data", "not a public address"),
    "private URL": ("http://10.0.0.1/x.png", "not a public address"),
    "ftp URL": ("ftp://example.com/x.png", "not valid base64"),
    "empty": ("", "image"),
    "a number": (5, "image"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_images_are_clear_400s_and_cost_nothing(demo_server: LiveServer, case: str) -> None:
    value, message = HOSTILE[case]
    key = demo_server.new_key(3)
    r = post(demo_server, key, {"prompt": "a red circle", "image": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error.startswith("image") and message in error, error
    assert credits(demo_server, key) == 3


def test_a_url_to_a_private_address_is_fetched_when_private_targets_are_allowed(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The guard is the webhook one: SD3SERVE_WEBHOOK_ALLOW_PRIVATE lets a private image host through."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sd3serve.engine.batching import BatchingEngine

    data = png(RED_TOP_LEFT)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("location", "/image.png")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    host = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    settings = Settings(device="cpu", data_dir=tmp_path_factory.mktemp("i2i-private"), webhook_allow_private=True)
    try:
        for server in run_live_server(settings, engine=BatchingEngine(settings)):
            key = server.new_key(2)
            for path in ("/image.png", "/redirect"):
                url = f"http://127.0.0.1:{host.server_address[1]}{path}"
                r = post(server, key, {"prompt": "a red circle", "image": url, "strength": 0, "image_format": "png"})
                assert r.status_code == 200, r.text
                assert Image.open(io.BytesIO(r.content)).size == (256, 256)
    finally:
        host.shutdown()
        host.server_close()


@pytest.mark.parametrize(
    ("field", "value"), [("strength", 1.01), ("strength", -0.1), ("strength", "0.5"), ("width", 32), ("loras", 3)]
)
def test_bad_fields_are_400s_naming_them(demo_server: LiveServer, field: str, value: object) -> None:
    key = demo_server.new_key(1)
    r = post(demo_server, key, {"prompt": "a red circle", "image": b64(png(RED_TOP_LEFT)), field: value})
    assert r.status_code == 400 and r.json()["error"].startswith(field), r.text


def test_the_segmind_sdk_calls_the_img2img_slug(demo_server: LiveServer) -> None:
    segmind = pytest.importorskip("segmind")
    key = demo_server.new_key(3)
    client = segmind.SegmindClient(api_key=key, base_url=demo_server.url + "/v1", timeout=120)
    slug = "stable-diffusion-3.5-turbo-img2img"
    body = {"prompt": "a blue circle at the top left on a green background", "image": b64(png(RED_TOP_LEFT)),
            "strength": 0.8, "seed": 0}  # fmt: skip
    image = client.run_sync(slug, **body)
    assert image.headers["content-type"] == "image/jpeg"
    v = judge(Image.open(io.BytesIO(image.content)))
    assert (v.colour, v.shape, v.position) == ("blue", "circle", "top left")
    job = client.submit_async(slug, **{**body, "base64": True})
    result = job.wait(timeout=120, interval=0.2)
    assert result["status"] == "COMPLETED" and result["seed"] == 0 and len(result["output"]) == 1
    assert credits(demo_server, key) == 1


# --- OpenAI's edits ---------------------------------------------------------------------------------------------


def client_for(server: LiveServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


def test_openai_images_edit(demo_server: LiveServer) -> None:
    key = demo_server.new_key(5)
    result = client_for(demo_server, key).images.edit(
        image=("red.png", png(RED_TOP_LEFT), "image/png"), prompt="a blue circle at the top left on a green background",
        n=2, response_format="b64_json", extra_body={"seed": 0, "strength": 0.8},
    )  # fmt: skip
    assert len(result.data) == 2
    first = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json or "")))
    assert first.format == "PNG" and first.size == (256, 256)
    v = judge(first)
    assert (v.colour, v.shape, v.position, v.background) == ("blue", "circle", "top left", "green")
    body = {"prompt": "a blue circle at the top left on a green background", "seed": 0, "strength": 0.8,
            "image": b64(png(RED_TOP_LEFT)), "image_format": "png"}  # fmt: skip
    same = post(demo_server, key, body)
    assert base64.b64decode(result.data[0].b64_json or "") == same.content  # the same generation as v1
    assert credits(demo_server, key) == 5 - 2 - 1


def test_openai_edit_size_and_url(demo_server: LiveServer) -> None:
    key = demo_server.new_key(2)
    result = client_for(demo_server, key).images.edit(
        image=("red.png", png(RED_TOP_LEFT), "image/png"), prompt="a red circle", size="512x512",
        response_format="url", extra_body={"steps": 1},
    )  # fmt: skip
    url = result.data[0].url or ""
    assert url.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (512, 512)


def test_openai_edit_with_a_mask_says_inpainting_is_not_supported(demo_server: LiveServer) -> None:
    key = demo_server.new_key(2)
    with pytest.raises(openai.BadRequestError) as e:
        client_for(demo_server, key).images.edit(
            image=("red.png", png(RED_TOP_LEFT), "image/png"), mask=("m.png", png(RED_TOP_LEFT), "image/png"),
            prompt="a red circle",
        )  # fmt: skip
    assert e.value.status_code == 400
    body = e.value.body
    assert isinstance(body, dict) and body["param"] == "mask" and "inpainting is not supported" in body["message"]
    assert credits(demo_server, key) == 2


@pytest.mark.parametrize(
    ("files", "data", "param"),
    [
        ({"image": ("x.gif", b"GIF89a", "image/gif")}, {"prompt": "a red circle"}, "image"),
        ({}, {"prompt": "a red circle"}, "image"),
        ({"image": ("x.png", png(RED_TOP_LEFT), "image/png")}, {}, "prompt"),
        ({"image": ("x.png", png(RED_TOP_LEFT), "image/png")}, {"prompt": "a", "n": "two"}, "n"),
        ({"image": ("x.png", png(RED_TOP_LEFT), "image/png")}, {"prompt": "a", "n": "11"}, "n"),
        ({"image": ("x.png", png(RED_TOP_LEFT), "image/png")}, {"prompt": "a", "size": "1x1"}, "size"),
        ({"image": ("x.png", png(RED_TOP_LEFT), "image/png")}, {"prompt": "a", "strength": "2"}, "strength"),
    ],
)
def test_openai_edit_bad_input(
    demo_server: LiveServer, files: dict[str, object], data: dict[str, str], param: str
) -> None:
    key = demo_server.new_key(1)
    r = httpx.post(f"{demo_server.url}/v1/images/edits", headers={"authorization": f"Bearer {key}"},
                   files=files or {"unused": ("u.txt", b"x", "text/plain")}, data=data, timeout=60)  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
    assert credits(demo_server, key) == 1


def test_openai_edit_must_be_multipart(demo_server: LiveServer) -> None:
    key = demo_server.new_key(1)
    r = httpx.post(f"{demo_server.url}/v1/images/edits", headers={"authorization": f"Bearer {key}"},
                   json={"prompt": "a", "image": "x"}, timeout=60)  # fmt: skip
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"]
