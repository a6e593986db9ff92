"""The playground at ``/``, driven in Debian's headless Chromium by Playwright (no browser download): load it,
enter a key, generate the seed request on the embedded demo model, check the picture's pixels; a bad key and a
field out of range show their messages; the page fits a phone; its Python snippet runs; a start image, its strength
and the demo adapter go into an image-to-image request while the live previews show.

Screenshots go to build/screenshots/ (ignored by git)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import sqlalchemy
from fastapi import Request
from fastapi.responses import StreamingResponse

from gated import GatedEngine
from live_server import LiveServer, run_live_server
from sd3demo.world import Scene, render
from sd3serve.api.images_in import resized
from sd3serve.settings import Settings
from waiting import wait_for

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots"
# The hosted page's request, with a prompt in the demo model's grammar, written as a person might.
PROMPT = "A Red Circle On A Blue Background."
EVENTS = "/v2/requests/{task_id}/events"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real app with the embedded demo model, built from the settings as `sd3serve serve` builds it."""
    yield from run_live_server(Settings(device="cpu", data_dir=tmp_path_factory.mktemp("playground")))


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (make test installs it: apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        yield b
        b.close()


def is_events(url: str) -> bool:
    return urlsplit(url).path.endswith("/events")


def open_page(browser: object, server: LiveServer, **context: object) -> object:
    page = browser.new_context(**context).new_page()  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # The page closes an event stream itself once the task has ended: that request "fails" on purpose.
    page.on("requestfailed", lambda r: is_events(r.url) or errors.append(f"request failed: {r.url}"))
    page.errors = errors
    page.goto(f"{server.url}/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return page


def centre_and_corner(page: object) -> list[list[int]]:
    """RGB at the centre and near the top-left corner of the first result image, read in the page."""
    return page.evaluate(  # type: ignore[attr-defined, no-any-return]
        """() => {
            const img = document.querySelector("img.result");
            const c = document.createElement("canvas");
            c.width = img.naturalWidth; c.height = img.naturalHeight;
            const g = c.getContext("2d");
            g.drawImage(img, 0, 0);
            const at = (x, y) => Array.from(g.getImageData(x, y, 1, 1).data.slice(0, 3));
            return [at(c.width / 2, c.height / 2), at(40, 40), [c.width, c.height]];
        }"""
    )


def test_generate_the_seed_request_in_the_browser(browser: object, demo_server: LiveServer) -> None:
    key = demo_server.new_key(credits=10)
    page = open_page(browser, demo_server, viewport={"width": 1280, "height": 1000})
    # Every field starts at the hosted API's default: the seed request.
    assert page.input_value("#steps") == "4" and page.input_value("#seed") == "98552302"
    assert page.input_value("#sampler") == "dpmpp_2m" and page.input_value("#scheduler") == "sgm_uniform"
    assert page.input_value("#width") == "1024" and page.input_value("#aspect_ratio") == "custom"
    assert page.locator("#demo-note").is_visible()
    page.fill("#api-key", key)
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    page.wait_for_selector("img.result", timeout=300_000)
    page.wait_for_selector("#history li", timeout=30_000)

    centre, corner, size = centre_and_corner(page)
    assert size == [1024, 1024]
    r, g, b = centre
    assert r > 150 and g < 110 and b < 110, f"the centre should be red, got {centre}"
    r, g, b = corner
    assert b > 150 and r < 110, f"the background should be blue, got {corner}"
    assert page.text_content("#info-seed") == "98552302"
    assert page.text_content("#info-cost") == "1 credit"
    assert page.text_content("#info-credits") == "9"
    assert "Credits: 9" in page.text_content("#credits")
    assert page.text_content("#phase") == "Done."
    link = page.locator("figcaption a")
    assert link.get_attribute("download") == "sd3serve-98552302.jpg"
    assert page.locator("#history li").count() == 1
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('sd3serve.history'))")
    assert stored[0]["body"]["prompt"] == PROMPT and stored[0]["seed"] == 98552302
    assert key not in str(stored)  # the key is stored only when asked to ("remember")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground-desktop.png"), full_page=True)

    # The Python snippet is the exact request: run it against the server.
    page.click("#tab-python")
    code = page.text_content("#code-text")
    assert f'"prompt": "{PROMPT}"' in code and '"base64": False' in code and '"seed": 98552302' in code
    for lang in ("curl", "javascript"):
        page.click(f"#tab-{lang}")
        assert '"seed":98552302' in page.text_content("#code-text").replace(" ", "")
    assert "responseType: 'arraybuffer'" in page.text_content("#code-text")
    assert page.errors == []  # type: ignore[attr-defined]
    page.context.close()
    run_dir = SCREENSHOTS.parent / "snippet"
    run_dir.mkdir(exist_ok=True)
    env = {**os.environ, "SD3SERVE_API_KEY": key}
    res = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "seed 98552302" in res.stdout and (run_dir / "out.jpg").read_bytes()[:2] == b"\xff\xd8"


def test_base64_results_show_in_the_browser(browser: object, demo_server: LiveServer) -> None:
    """With "Base64" ticked the task's images come back inline: the page decodes them itself (its CSP lets it
    fetch only from this server) and shows the picture for the credit it was charged."""
    key = demo_server.new_key(credits=3)
    page = open_page(browser, demo_server, viewport={"width": 1280, "height": 1000})
    blocked: list[str] = []
    page.on("console", lambda m: "Content Security Policy" in m.text and blocked.append(m.text))
    page.fill("#api-key", key)
    page.fill("#prompt", PROMPT)
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.check("#base64")
    page.click("#generate")
    page.wait_for_selector("img.result, #error:not([hidden])", timeout=300_000)
    assert page.locator("img.result").count() == 1, page.text_content("#error")
    page.wait_for_function("() => document.querySelector('img.result').naturalWidth > 0", timeout=30_000)
    centre, corner, size = centre_and_corner(page)
    assert size == [256, 256]
    assert centre[0] > 150 and centre[1] < 110 and centre[2] < 110, f"the centre should be red, got {centre}"
    assert corner[2] > 150 and corner[0] < 110, f"the background should be blue, got {corner}"
    assert page.text_content("#info-credits") == "2"
    assert blocked == [] and page.errors == []  # type: ignore[attr-defined]
    page.context.close()


def test_a_bad_key_shows_the_error(browser: object, demo_server: LiveServer) -> None:
    page = open_page(browser, demo_server)
    page.fill("#api-key", "sk-not-a-key")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])", timeout=30_000)
    assert page.text_content("#error").startswith("401:")
    assert page.locator("img.result").count() == 0
    page.context.close()


def test_a_field_out_of_range_shows_the_message(browser: object, demo_server: LiveServer) -> None:
    page = open_page(browser, demo_server)
    page.fill("#api-key", demo_server.new_key(credits=1))
    page.fill("#steps", "71")
    page.fill("#guidance_scale", "0.5")
    page.click("#generate")
    assert page.text_content("#steps-error") == "steps: an integer from 1 to 70"
    assert page.text_content("#guidance_scale-error") == "guidance_scale: a number from 1 to 15"
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    assert page.evaluate("() => document.activeElement.id") == "steps"
    assert "out of range" in page.text_content("#error")
    page.fill("#steps", "8")
    page.locator("#steps").dispatch_event("change")
    assert page.text_content("#steps-error") == ""
    page.context.close()


def test_usable_at_phone_width(browser: object, demo_server: LiveServer) -> None:
    page = open_page(browser, demo_server, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
    assert page.locator("#info").is_hidden() and page.locator("#error").is_hidden()  # nothing to show yet
    for control in page.locator("input, select, textarea").all():  # every control has a label
        assert control.evaluate("e => e.labels.length > 0 || e.hasAttribute('aria-label')"), control
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground-phone.png"), full_page=True)
    page.context.close()


def test_the_page_needs_nothing_from_elsewhere(demo_server: LiveServer) -> None:
    with httpx.Client(base_url=demo_server.url) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace('href="/', "")  # no absolute URL: no CDN
        config = c.get("/playground/config.json").json()
        assert config["fields"]["steps"] == {"type": "integer", "default": 4, "minimum": 1, "maximum": 70}
        assert "dpmpp_2m" in config["fields"]["sampler"]["enum"]
        assert config["aspect_ratios"]["16:9"] == [1344, 768] and config["demo_model"] is True
        has_events = EVENTS in c.get("/openapi.json").json()["paths"]
        assert config["paths"]["events"] == (EVENTS if has_events else None)  # else the page polls
        assert c.get("/playground/playground.js").status_code == 200
        assert c.get("/playground/nope.js").status_code == 404
        assert c.post("/").status_code == 405


def test_progress_comes_from_the_event_stream_when_the_server_has_one(browser: object, demo_server: LiveServer) -> None:
    """Where the server has GET /v2/requests/{id}/events, the page follows it instead of polling status. Without
    the real route, one stands in for it (same events: queued, progress {step, steps}, completed), fed by status."""
    calls: list[str] = []

    async def events(task_id: str, request: Request) -> StreamingResponse:
        calls.append(task_id)
        headers = {"x-api-key": request.headers["x-api-key"]}

        async def stream() -> AsyncIterator[str]:
            yield "id: 0\nevent: queued\ndata: {}\n\n"
            async with httpx.AsyncClient(base_url=demo_server.url, headers=headers) as c:
                while (status := (await c.get(f"/v2/requests/{task_id}/status")).json())["status"] != "COMPLETED":
                    if progress := status.get("progress"):
                        yield f"id: {progress['step'] + 1}\nevent: progress\ndata: {json.dumps(progress)}\n\n"
                    yield ": keep-alive\n\n"
                    await asyncio.sleep(0.05)
            yield 'id: 1000\nevent: completed\ndata: {"status": "COMPLETED"}\n\n'

        return StreamingResponse(stream(), media_type="text/event-stream")

    real = EVENTS in httpx.get(f"{demo_server.url}/openapi.json").json()["paths"]
    if not real:
        demo_server.app.add_api_route(EVENTS, events, methods=["GET"])
    try:
        page = open_page(browser, demo_server)
        asked: list[str] = []
        page.on("request", lambda r: asked.append(r.url))
        page.fill("#api-key", demo_server.new_key(credits=1))
        page.fill("#width", "256")
        page.fill("#height", "256")
        page.click("#generate")
        page.wait_for_selector("img.result", timeout=300_000)
        assert page.text_content("#phase") == "Done." and page.locator("#error").is_hidden()
        assert any(is_events(url) for url in asked) and (real or len(calls) == 1)
        assert not any(url.endswith("/status") for url in asked)  # no polling
        page.context.close()
    finally:
        demo_server.app.router.routes[:] = [
            r for r in demo_server.app.router.routes if real or getattr(r, "path", "") != EVENTS
        ]


@pytest.fixture(scope="module")
def gated_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, GatedEngine]]:
    """The demo model behind an engine whose batches wait for ``engine.gate`` (set: they run at once)."""
    settings = Settings(device="cpu", data_dir=tmp_path_factory.mktemp("playground-i2i"), batch_wait_ms=0)
    engine = GatedEngine(settings)
    gen = run_live_server(settings, engine=engine)
    try:
        yield next(gen), engine
    finally:
        engine.gate.set()
        gen.close()


def stored_request(server: LiveServer, task_id: str) -> dict[str, object]:
    """The request as the server stored it with the task (the image as its digest)."""
    db = sqlalchemy.create_engine(server.settings.resolved_database_url)
    with db.connect() as conn:
        row = conn.execute(sqlalchemy.text("SELECT request_json FROM tasks WHERE id = :id"), {"id": task_id}).one()
    db.dispose()
    return json.loads(row[0])  # type: ignore[no-any-return]


def test_image_to_image_with_the_demo_adapter_and_live_previews(
    browser: object, gated_demo: tuple[LiveServer, GatedEngine], tmp_path: Path
) -> None:
    """Upload a start image, set its strength, tick the demo adapter: the page sends an image-to-image request
    with all three, shows the live previews of its event stream while it runs, then the picture at the image's
    size. The request is checked where the server stored it."""
    server, engine = gated_demo
    service = server.app.state.sd3.service
    key = server.new_key(credits=5)
    start = render(Scene("red", "circle", "green", position="top left"), 320, 192)
    start.save(tmp_path / "start.png")
    page = open_page(browser, server, viewport={"width": 1280, "height": 1000})
    page.fill("#api-key", key)
    page.locator("#api-key").dispatch_event("change")  # lists the key's adapters
    page.wait_for_selector("#lora-striped", timeout=30_000)
    assert page.locator("#strength").is_disabled()  # no image yet: text-to-image
    page.set_input_files("#init-image", str(tmp_path / "start.png"))
    page.wait_for_selector("body[data-init-image=ready]", timeout=30_000)
    assert page.locator("#width").is_disabled() and "320×192" in page.text_content("#size-note")
    page.locator("#strength").evaluate("e => { e.value = '0.8'; e.dispatchEvent(new Event('input', {bubbles: 1})); }")
    assert page.text_content("#strength-value") == "0.80"
    page.check("#lora-striped")
    page.fill("#prompt", "a blue circle at the top left on a green background")
    page.evaluate("""() => {
        window.previews = [];
        const img = document.getElementById("live-preview");
        new MutationObserver(() => window.previews.push(img.src))
            .observe(img, {attributes: true, attributeFilter: ["src"]});
    }""")
    engine.gate = threading.Event()  # the batch waits until the page watches its previews
    page.click("#generate")
    wait_for(lambda: service.previews.watching() == 1, timeout=60)
    engine.gate.set()
    page.wait_for_selector("img.result", timeout=300_000)
    page.wait_for_function("() => document.querySelector('img.result').naturalWidth > 0", timeout=30_000)

    previews = page.evaluate("() => window.previews")
    assert previews and all(p.startswith("data:image/jpeg;base64,") for p in previews), previews[:1]
    assert page.locator("#live").is_hidden()  # the picture replaces the preview
    size = page.evaluate("() => [document.querySelector('img.result').naturalWidth, "
                         "document.querySelector('img.result').naturalHeight]")  # fmt: skip
    assert size == [320, 192]
    task_id = page.text_content("#info-id")
    sent = stored_request(server, task_id)
    assert sent["strength"] == 0.8 and sent["loras"] == [{"name": "striped", "scale": 1.0}]
    assert sent["image_sha256"] == resized(start, 320, 192).digest and "image" not in sent
    assert sent["prompt"] == "a blue circle at the top left on a green background"

    page.wait_for_selector("#history li", timeout=30_000)
    stored = page.evaluate("() => JSON.parse(localStorage.getItem('sd3serve.history'))")
    assert "image" not in stored[0]["body"] and stored[0]["img2img"] and stored[0]["size"] == [320, 192]
    page.click("#tab-python")
    code = page.text_content("#code-text")
    assert "/v1/stable-diffusion-3.5-turbo-img2img" in code and 'open("input.png", "rb")' in code
    assert '"strength": 0.8' in code and '"name": "striped"' in code
    assert page.errors == []  # type: ignore[attr-defined]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "playground-img2img.png"), full_page=True)
    page.context.close()
