"""Torch's CPU threads, set before torch starts.

libgomp (torch's OpenMP runtime) reads ``OMP_WAIT_POLICY`` once, when it is loaded. Unset, an idle OpenMP
thread spins on its core before it sleeps; when another process wants that core, the spinning costs the
generation several times its time (bench/threads.py). PASSIVE threads sleep at once. So the policy has to be in
the environment before the first ``import torch`` of the process: call `configure_threads` first.

PASSIVE has a price when the CPU is quiet: every parallel region wakes sleeping threads, which costs more than a
small op saves by sharing it. A small transformer's many small ops run faster on one thread, while the VAE's large
convolutions scale with threads. So the pipeline sets torch's threads per phase (`phase_threads`, applied with
`torch_threads` around each phase on the model's thread and restored after it), and model workers take turns to
decode on every core while the others denoise on one thread each. torch's thread count is a setting
of the calling thread (OpenMP's), so each model worker thread sets its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sd3serve import allocator
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

WAIT_POLICY = "PASSIVE"
# A transformer narrower than this (hidden size) gets one thread for denoising by default: its matrices are too
# small for OpenMP threads to pay for waking (the demo's is 192 wide; SD3.5's 1536 and 2432).
SMALL_TRANSFORMER_WIDTH = 512


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def configure_threads(settings: Settings) -> None:
    """First thing in a process that will run the model: malloc's tuning (before any thread has an arena of its
    own: `sd3serve.allocator`), OMP_WAIT_POLICY=PASSIVE unless the user set it, then torch's thread counts; logs
    the effective settings."""
    allocator.tune_at_start(settings.malloc_tuning, settings.device)
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


@dataclass(frozen=True)
class PhaseThreads:
    """torch threads per worker for each phase (None: leave torch's setting as it is), the number of model workers,
    and the cores they share."""

    denoise: int | None
    decode: int | None
    workers: int
    cores: int

    @property
    def decode_slots(self) -> int:
        """Workers that may decode at once: as many as the cores hold at ``decode`` threads each."""
        return max(1, self.cores // self.decode) if self.decode else self.workers


def phase_threads(settings: Settings, *, device_type: str, transformer_width: int) -> PhaseThreads:
    """The thread plan. CUDA: torch's setting as it is and the workers asked for (default 1). CPU, of the cores
    (or ``threads``): denoising on one thread for a small transformer, else on a worker's share; by default one
    worker per core for a small transformer (each denoises on its own core, so concurrent requests do not wait for
    one another's small ops) and one for a large one; the decode on every core, one worker at a time.

    The decode's thread count is fixed, never chosen by the load: a channels-last convolution's float sums depend
    on its thread count, and a request's pixels must not depend on which requests ran beside it."""
    budget = settings.threads or available_cores()
    if device_type != "cpu":
        return PhaseThreads(settings.denoise_threads or None, settings.decode_threads or None,
                            settings.model_workers or 1, budget)  # fmt: skip
    small = transformer_width < SMALL_TRANSFORMER_WIDTH
    workers = settings.model_workers or (budget if small else 1)
    denoise = settings.denoise_threads or (1 if small else max(1, budget // workers))
    return PhaseThreads(denoise, settings.decode_threads or budget, workers, budget)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads on this thread set to ``n`` for the block (None: unchanged), restored after."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
