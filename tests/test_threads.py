"""``sd3serve.threads``: the thread settings are applied before torch starts. Each check runs in a fresh
interpreter, so this process's torch keeps its own settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def run_python(code: str, **env: str | None) -> str:
    """stdout of `python -c code` with the environment changed by `env` (None: unset)."""
    environ = {k: v for k, v in os.environ.items() if k not in env}
    environ |= {k: v for k, v in env.items() if v is not None}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_cli_does_not_import_torch() -> None:
    # libgomp reads OMP_WAIT_POLICY when torch loads: the CLI must get to configure_threads first.
    assert run_python("import sys, sd3serve.cli; print('torch' in sys.modules)").strip() == "False"


CONFIGURE = """
    import json, os, sys, threading
    from sd3serve.settings import Settings
    from sd3serve.threads import configure_threads
    configure_threads(Settings())
    import torch
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # as the engine's thread sees it
    t.start(); t.join()
    print(json.dumps({"threads": torch.get_num_threads(), "thread": seen[0],
                      "policy": os.environ.get("OMP_WAIT_POLICY")}))
"""


def test_threads_setting_sets_torchs_thread_count() -> None:
    out = json.loads(run_python(CONFIGURE, SD3SERVE_THREADS="1", OMP_NUM_THREADS=None))
    assert out["threads"] == 1 and out["thread"] == 1


def test_threads_default_to_the_cores_available() -> None:
    out = json.loads(run_python(CONFIGURE, SD3SERVE_THREADS=None, OMP_NUM_THREADS="1"))
    assert out["threads"] == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_wait_policy_is_passive_only_when_unset(given: str | None, expected: str) -> None:
    out = json.loads(run_python(CONFIGURE, OMP_WAIT_POLICY=given))
    assert out["policy"] == expected
