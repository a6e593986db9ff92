"""Torch's CPU threads, set before torch starts.

libgomp (torch's OpenMP runtime) reads ``OMP_WAIT_POLICY`` once, when it is loaded. Unset, an idle OpenMP
thread spins on its core before it sleeps; when another process wants that core, the spinning costs the
generation several times its time (bench/threads.py). PASSIVE threads sleep at once. So the policy has to be in
the environment before the first ``import torch`` of the process: call `configure_threads` first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any

from sd3serve.settings import Settings

log = logging.getLogger(__name__)

WAIT_POLICY = "PASSIVE"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def configure_threads(settings: Settings) -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it, then torch's thread counts; logs the effective settings."""
    set_wait_policy()
    set_thread_counts(settings)
    log.info("threads: %s", describe(thread_report()))


def set_wait_policy() -> None:
    if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
        log.warning("torch was imported before the thread settings: OMP_WAIT_POLICY=%s has no effect", WAIT_POLICY)
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def set_thread_counts(settings: Settings) -> None:
    """torch's intra-op threads (which threads started later inherit) and, where still allowed, inter-op threads."""
    import torch

    threads = settings.threads or available_cores()
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # allowed once, and only before any inter-op work has started
        torch.set_num_interop_threads(threads)


def thread_report() -> dict[str, Any]:
    """The effective settings: torch's thread counts, the OpenMP variables, and the cores available."""
    import torch

    return {
        "torch_threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "cores": available_cores(),
    }


def describe(report: dict[str, Any]) -> str:
    return ", ".join(f"{k} {'unset' if v is None else v}" for k, v in report.items())
