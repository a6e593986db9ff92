"""Subprocesses run the sd3serve this test session imported: under mutation testing that is mutmut's copy in
mutants/ (the editable install would otherwise hand them the working tree), and MUTANT_UNDER_TEST, inherited,
switches the same mutant on in them."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import sd3serve


def same_code_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with the directory holding this session's sd3serve first on PYTHONPATH."""
    out = dict(os.environ if env is None else env)
    here = str(Path(sd3serve.__file__).resolve().parents[1])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (here, out.get("PYTHONPATH", "")) if p)
    return out
