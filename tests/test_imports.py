"""What importing a module costs: the request schema loads no tensor library, and importing the engine changes
nothing in the process (library settings are applied when a model is loaded). Each check runs in a fresh
interpreter, since this one has long imported everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sd3serve

HEAVY = ("torch", "diffusers", "transformers", "huggingface_hub")


def run_python(code: str) -> dict[str, object]:
    """Run ``code`` in a fresh interpreter on the same sd3serve, without the HF/transformers variables this test
    session set; ``code`` prints one JSON object, returned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(sd3serve.__file__).parents[1]), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return result


def test_the_request_schema_imports_no_tensor_library() -> None:
    out = run_python(
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        "import sd3serve.api.schemas, sd3serve.engine, sd3serve.catalogue\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "print(json.dumps({'heavy': heavy, 'env_changed': dict(os.environ) != before}))"
    )
    assert out == {"heavy": [], "env_changed": False}


def test_importing_model_loading_leaves_the_process_settings_alone() -> None:
    out = run_python(
        "import json, logging, os\n"
        "from transformers.utils import logging as tl\n"
        "before = (dict(os.environ), tl.get_verbosity(), logging.getLogger('transformers').level)\n"
        "import sd3serve.engine.loading, sd3serve.engine.pipeline\n"
        "after = (dict(os.environ), tl.get_verbosity(), logging.getLogger('transformers').level)\n"
        "print(json.dumps({'unchanged': after == before}))"
    )
    assert out == {"unchanged": True}
