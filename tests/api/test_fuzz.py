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

import os
from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from live_server import LiveServer, run_live_server
from sd3serve.api.app import create_app
from sd3serve.settings import Settings
from stub_engine import StubEngine

EXAMPLES = int(os.environ.get("SD3SERVE_FUZZ_EXAMPLES", "60"))
OPENAPI = create_app(Settings(device="cpu", rate_limit_per_minute=0)).openapi()
schema = schemathesis.openapi.from_dict(OPENAPI)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings_ = Settings(data_dir=tmp_path_factory.mktemp("sd3fuzz"), device="cpu", rate_limit_per_minute=0)
    yield from run_live_server(settings_, engine=StubEngine())


@pytest.fixture(scope="module")
def fuzz_key(fuzz_server: LiveServer) -> str:
    return fuzz_server.store.create_key(credits=10**9, name="fuzz")[1]


def test_the_fuzzed_schema_is_the_served_one(fuzz_server: LiveServer) -> None:
    assert httpx.get(f"{fuzz_server.url}/openapi.json", timeout=30).json() == OPENAPI


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_5xx(case: schemathesis.Case, fuzz_server: LiveServer, fuzz_key: str) -> None:
    # schemathesis.toml adds 413 to the statuses that reject invalid data (an invalid body can also be too large).
    case.call_and_validate(base_url=fuzz_server.url, headers={"x-api-key": fuzz_key}, timeout=120)
