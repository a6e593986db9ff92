"""Schemathesis against /openapi.json: no input gives a 5xx, and every response conforms to the published schema.

The engine is a stub (flat images, instantly): this fuzzes the HTTP layer, validation and the stores.
SD3SERVE_FUZZ_EXAMPLES sets the examples per operation (CI: 60; `SD3SERVE_FUZZ_EXAMPLES=150 make test` runs
over 1000 cases in all).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings

from live_server import run_live_server
from sd3serve.settings import Settings
from stub_engine import StubEngine

EXAMPLES = int(os.environ.get("SD3SERVE_FUZZ_EXAMPLES", "60"))

_server_gen = run_live_server(
    Settings(data_dir=Path(tempfile.mkdtemp(prefix="sd3fuzz-")), device="cpu", rate_limit_per_minute=0,
             max_request_work=0),  # the work limit (a 400 for valid bodies) is tested in test_one_path.py
    engine=StubEngine(),
)
_server = next(_server_gen)
_key = _server.store.create_key(credits=10**9, name="fuzz")[1]
schema = schemathesis.openapi.from_url(f"{_server.url}/openapi.json")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_and_never_5xx(case: schemathesis.Case) -> None:
    # schemathesis.toml adds 413 to the statuses that reject invalid data (an invalid body can also be too large).
    case.call_and_validate(headers={"x-api-key": _key}, timeout=120)


def teardown_module() -> None:
    _server_gen.close()
