"""Docs that work offline (local Swagger UI and ReDoc assets, "Authorize" for the key, every header and error
documented), the docs' own metric labels, and a start-up that answers HTTP before the model is ready."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers.same_code import same_code_env
from live_server import LiveServer, run_live_server
from sd3serve.errors import Overloaded
from sd3serve.settings import Settings
from stub_engine import StubEngine

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
GENERATE = "/v1/stable-diffusion-3.5-turbo-txt2img"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from run_live_server(Settings(data_dir=tmp_path_factory.mktemp("docs"), device="cpu"), engine=StubEngine())


def test_docs_pages_use_local_assets_only(server: LiveServer) -> None:
    with server.client() as c:
        pages = (("/docs", "/docs/assets/swagger-ui-bundle.js"), ("/redoc", "/docs/assets/redoc.standalone.js"))
        for page, asset in pages:
            html = c.get(page)
            assert html.status_code == 200 and asset in html.text
            assert "cdn" not in html.text and "fonts.googleapis" not in html.text
            js = c.get(asset)
            assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
            assert len(js.content) > 100_000
        assert c.get("/docs/assets/swagger-ui.css").status_code == 200
        assert c.get("/docs/assets/..%2Fcore.py").status_code == 404
        assert c.get("/docs/oauth2-redirect").status_code == 200


def test_the_schema_documents_keys_headers_and_errors(server: LiveServer) -> None:
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["AdminKey"]["name"] == "x-admin-key"
    v1 = spec["paths"][GENERATE]["post"]
    assert v1["security"] == [{"ApiKey": []}]
    assert not any(p["name"] == "x-api-key" for p in v1.get("parameters", []))  # "Authorize" sends it
    assert set(v1["responses"]["200"]["headers"]) >= {
        "x-remaining-credits", "x-cost", "x-generation-time", "x-seed-value", "x-request-id", "x-prompt-truncated",
    }  # fmt: skip
    assert set(v1["responses"]["429"]["headers"]) >= {"x-rate-limit-reset-at-utc", "Retry-After"}
    assert "Retry-After" in v1["responses"]["503"]["headers"]
    for status in ("400", "401", "406", "413", "500"):
        assert v1["responses"][status]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorResponse")
    v2 = spec["paths"]["/v2/stable-diffusion-3.5-turbo-txt2img"]["post"]
    assert {"x-remaining-credits", "x-cost"} <= set(v2["responses"]["200"]["headers"])
    assert spec["paths"]["/v2/requests/{task_id}/status"]["get"]["security"] == [{"ApiKey": []}]
    assert spec["paths"]["/admin/keys"]["get"]["security"] == [{"AdminKey": []}]
    assert "loading" in spec["paths"]["/readyz"]["get"]["responses"]["503"]["description"]
    for path in spec["paths"].values():
        for operation in path.values():
            for response in operation["responses"].values():
                assert "x-request-id" in response["headers"]


def test_every_generation_route_documents_what_it_sends(server: LiveServer) -> None:
    """Credit headers, the rate limit's 429 and the overload's Retry-After on every route that generates, whatever
    its path (they were once matched by path suffix, and the image-to-image routes went undocumented)."""
    with server.client() as c:
        spec = c.get("/openapi.json").json()
    generating = {
        (method, path): operation
        for path, operations in spec["paths"].items()
        for method, operation in operations.items()
        if "406" in operation["responses"] or path.startswith("/v1/images/")
    }
    assert len(generating) == 6  # txt2img and img2img, v1 and v2; OpenAI generations and edits
    for (method, path), operation in generating.items():
        responses = operation["responses"]
        synchronous = not path.startswith("/v2/")
        wanted = {"x-remaining-credits", "x-cost"} | ({"x-generation-time", "x-seed-value"} if synchronous else set())
        assert wanted <= set(responses["200"]["headers"]), (method, path)
        assert "429" in responses and "Retry-After" in responses["503"].get("headers", {}), (method, path)


def test_docs_routes_have_their_own_metric_labels(server: LiveServer) -> None:
    with server.client() as c:
        for path in ("/docs", "/openapi.json", "/redoc", "/docs/assets/favicon.png", "/", "/playground/config.json"):
            assert c.get(path).status_code == 200
        metrics = c.get("/metrics").text
    for template in ("/docs", "/openapi.json", "/redoc", "/docs/assets/{name}", "/", "/playground/config.json"):
        assert f'route="{template}",status="200"' in metrics
    assert 'route="unmatched",status="200"' not in metrics


def test_swagger_ui_authorize_sends_the_key_offline(server: LiveServer) -> None:
    """In Chromium with every request off this server refused: Swagger UI loads, "Authorize" takes the key and
    "Try it out" on /v1/get-user-credits answers with the key's credits."""
    key = server.new_key(credits=42)
    elsewhere: list[str] = []
    with browser_page() as page:

        def refuse_elsewhere(route: Any) -> None:
            url = route.request.url
            if url.startswith(server.url) or url.startswith("data:"):
                route.continue_()
            else:
                elsewhere.append(url)
                route.abort()

        page.route("**/*", refuse_elsewhere)
        page.goto(f"{server.url}/docs")
        page.click("button.authorize", timeout=30_000)
        api_key = page.locator(".auth-container").filter(has_text="x-api-key")
        api_key.locator("input").fill(key)
        api_key.locator("button.modal-btn.authorize").click()
        api_key.locator("button.btn-done").click()
        operation = page.locator("#operations-credits-get_user_credits_v1_get_user_credits_get")
        operation.locator(".opblock-summary").click()
        operation.get_by_role("button", name="Try it out").click()
        operation.get_by_role("button", name="Execute").click()
        body = operation.locator(".responses-wrapper .live-responses-table .response-col_description pre").first
        body.wait_for(timeout=30_000)
        assert '"credits": 42' in body.text_content()
    assert elsewhere == []


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    """A page in Debian's headless Chromium, driven by Playwright (no browser download)."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is needed (make test installs it: apt-get install chromium)")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI: no sandbox
        try:
            yield browser.new_page()
        finally:
            browser.close()


class SlowStartEngine(StubEngine):
    """Ready only once ``release`` is set, as a real model is only after minutes of loading."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.ready = False

    @property  # type: ignore[override]
    def is_ready(self) -> bool:
        return self.ready

    async def start(self) -> None:
        while not self.release.is_set():
            await asyncio.sleep(0.01)
        self.ready = True

    def admit(self) -> None:
        if not self.ready:
            raise Overloaded("the model is still loading", retry_after_s=5)


def test_http_answers_while_the_model_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    engine = SlowStartEngine()
    with caplog.at_level(logging.INFO, logger="sd3serve"):
        gen = run_live_server(Settings(data_dir=tmp_path, device="cpu"), engine=engine, ready=False)
        server = next(gen)
    try:
        with server.client() as c:
            assert c.get("/healthz").json() == {"status": "ok"}
            loading = c.get("/readyz")
            assert loading.status_code == 503 and loading.json() == {"status": "loading"}
            assert c.get("/docs").status_code == 200 and c.get("/").status_code == 200
            key = server.new_key()
            early = c.post(GENERATE, json={"prompt": "a red circle"}, headers={"x-api-key": key})
            assert early.status_code == 503 and "still loading" in early.json()["error"]
            assert early.headers["retry-after"] == "5"
            with browser_page() as page:  # the playground says the model is loading, then that it is ready
                page.goto(f"{server.url}/")
                page.wait_for_selector("#phase:has-text('The model is still loading')", timeout=30_000)
                engine.release.set()
                page.wait_for_selector("#phase:has-text('Ready.')", timeout=30_000)
            assert c.get("/readyz").json() == {"status": "ready"}
            assert c.post(GENERATE, json={"prompt": "a red circle"}, headers={"x-api-key": key}).status_code == 200
    finally:
        gen.close()
    log = caplog.text
    assert f"data dir {tmp_path}" in log and "database sqlite:///" in log
    assert "/docs" in log and "playground http://" in log
    assert f"no API key exists yet: create one with `sd3serve keys --data-dir '{tmp_path}' create" in log


def test_shutdown_while_the_model_loads(tmp_path: Path) -> None:
    engine = SlowStartEngine()  # never released: the start is cancelled at shutdown
    gen = run_live_server(Settings(data_dir=tmp_path, device="cpu"), engine=engine, ready=False)
    server = next(gen)
    assert httpx.get(f"{server.url}/readyz").status_code == 503
    gen.close()  # joins the server's thread: returns only once the lifespan has finished
    assert not engine.ready


def test_serve_exits_1_when_the_model_cannot_be_loaded(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "sd3serve", "serve", "--model", str(tmp_path / "nowhere"), "--port", "0",
           "--data-dir", str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=same_code_env())
    assert res.returncode == 1, res.stderr
    assert "the model could not be loaded" in res.stderr and "no such file or directory" in res.stderr


def test_without_background_start_the_model_loads_before_requests(tmp_path: Path) -> None:
    """For hosts that route to an app as soon as its lifespan has run (a Ray Serve replica)."""
    from fastapi.testclient import TestClient

    from sd3serve.api.app import create_app

    engine = SlowStartEngine()
    engine.release.set()
    app = create_app(Settings(data_dir=tmp_path, device="cpu"), model_engine=engine, start_in_background=False)
    with TestClient(app) as c:
        assert engine.ready and c.get("/readyz").json() == {"status": "ready"}
