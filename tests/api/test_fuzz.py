"""Schemathesis against /openapi.json: no input gives a 5xx, and every response conforms to the published schema.

The engine is a stub (flat images, instantly): this fuzzes the HTTP layer, validation and the stores.
SD3SERVE_FUZZ_EXAMPLES sets the examples per operation (CI: 60; `SD3SERVE_FUZZ_EXAMPLES=150 make test` runs
over 1000 cases in all).

Collecting this file starts nothing: the schema is the app's own OpenAPI document (``create_app`` opens no
database and no port until its lifespan runs), and the live server is a fixture of the test. The served
/openapi.json is checked to be that same document. (schemathesis 4.32's ``pytest.from_fixture`` would be the
lazy way, but it reads ``Function._nodeid``, which pytest 9.2 no longer has.)
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.specs.openapi.checks import negative_data_rejection

from live_server import LiveServer, run_live_server
from sd3serve.api.app import create_app
from sd3serve.service import webhook_delivery
from sd3serve.settings import Settings
from stub_engine import StubEngine

EXAMPLES = int(os.environ.get("SD3SERVE_FUZZ_EXAMPLES", "60"))
OPENAPI = create_app(Settings(device="cpu", rate_limit_per_minute=0)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    # The work limit (a 400 for some valid bodies) is tested in test_one_path.py. Webhook targets are not checked
    # against private networks here, and nothing is sent: fuzzed URLs name arbitrary hosts.
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("sd3fuzz"), device="cpu", rate_limit_per_minute=0,
                         max_request_work=0, webhook_allow_private=True)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(webhook_delivery.WebhookSender, "attempt", _not_sent)
        yield from run_live_server(settings_, engine=StubEngine())


def _png(side: int) -> str:
    out = io.BytesIO()
    Image.new("RGB", (side, side), (200, 30, 30)).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


SMALL_PNG = _png(64)


def _only_what_the_schema_can_say(case: schemathesis.Case) -> None:
    """Valid bodies without the two rules no JSON schema states: an adapter must exist on this server and be named
    once (tests/api/test_loras.py), edits take no mask, and an image must be a picture (tests/api/test_img2img.py
    tries the bad ones). Invalid bodies stay as they are."""
    meta = getattr(case, "_meta", None)
    if meta is None or not meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = dict(case.body)
    if "loras" in body:
        body["loras"] = []
    body.pop("mask", None)
    if "image" in body:  # any string is schema-valid; a picture is what the route reads
        multipart = (case.media_type or "").startswith("multipart/")
        body["image"] = base64.b64decode(SMALL_PNG) if multipart else SMALL_PNG
    case.body = body


FRAMING = {"content-length", "transfer-encoding", "host", "connection"}


def _framing_left_to_the_client(case: schemathesis.Case) -> None:
    """Headers that frame the message (a fuzzed ``Content-Length: FIoh``) are refused by uvicorn's HTTP parser before
    any app code runs, in plain text the app's schema cannot describe: the client sets them, not the fuzzer."""
    if case.headers and any(name.lower() in FRAMING for name in case.headers):  # reassigned only when it changes
        case.headers = {name: value for name, value in case.headers.items() if name.lower() not in FRAMING}


async def _not_sent(*_: object) -> webhook_delivery.Outcome:
    return webhook_delivery.Outcome(204, None, False)


@pytest.fixture(scope="module")
def fuzz_key(fuzz_server: LiveServer) -> str:
    info, key = fuzz_server.store.create_key(credits=10**9, name="fuzz")
    fuzz_server.store.rotate_secret(key_id=info.id)  # so that webhook_url is accepted
    return key


def test_the_fuzzed_schema_is_the_served_one(fuzz_server: LiveServer) -> None:
    assert httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json() == OPENAPI


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_5xx(case: schemathesis.Case, fuzz_server: LiveServer, fuzz_key: str) -> None:
    # schemathesis.toml adds 413 to the statuses that reject invalid data (an invalid body can also be too large).
    _framing_left_to_the_client(case)  # first: schemathesis may then relabel the case (positive / negative)
    _only_what_the_schema_can_say(case)
    # The edits form is read field by field as OpenAI's is (unknown fields ignored, numbers from text): schemathesis's
    # notion of an invalid multipart body does not apply there; its positive cases and 5xx are still checked.
    excluded = [negative_data_rejection] if case.path == "/v1/images/edits" else None
    case.call_and_validate(
        base_url=fuzz_server.url, headers={"x-api-key": fuzz_key}, timeout=120, excluded_checks=excluded
    )
