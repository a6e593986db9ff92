"""glibc's malloc tuned for a server that allocates the same large buffers for every image.

By default glibc serves blocks over its mmap threshold (128 KiB, rising with use up to 32 MiB) with fresh
``mmap`` and returns them with ``munmap``, and trims the heap's free top back to the OS: a VAE decode's
activations are given back after every image and faulted in again, page by page, for the next (thousands of minor
page faults per 512² image, hundreds of thousands at 1024², a third of its CPU). Tuned, the process keeps what it
has used: one arena, no mmap for large blocks, no trimming. The price is memory: the process stays at its peak
RSS instead of dropping back between images (docs/performance.md has the numbers).

Only glibc has ``mallopt``; elsewhere (musl, macOS) nothing is changed. CUDA's memory comes from its own caching
allocator, so on a CUDA device the host allocator is left as it is.

When matters as much as what: glibc gives a thread its arena at its first ``malloc``, and a thread that already
has an arena of its own keeps it after ``M_ARENA_MAX`` is set. A thread arena's heaps are at most 64 MiB, so its
blocks of 64 MiB or more (a 1024² decode's activations) come from ``mmap`` whatever ``M_MMAP_MAX`` says, and go
back at ``free``: 32,770 faults per 1024² image, against 0 when the process was tuned before its first thread
(measured on the demo, one process, same request eight times). So `tune_at_start` runs first thing in the
process (``serve``, ``generate``), before torch is imported, and a Ray replica, whose process Ray starts with
threads of its own, gets the same settings as glibc's environment variables (`ENVIRONMENT`), read at its start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import threading
from typing import Literal

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8

TRIM_NEVER = 2**31 - 1  # bytes of free heap top kept before trimming: in effect, never trim (mallopt takes an int)
TOP_PAD = 64 * 2**20  # bytes the heap grows by beyond each request, so that growing it is rare
# (parameter, value): one arena for every thread (threads' arenas are mmap'd heaps of at most 64 MiB, too small
# for a 1024² activation, and a second arena would keep a second peak), no mmap (all blocks from the heap, reused
# after free), no trimming.
TUNING = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_NEVER), (M_TOP_PAD, TOP_PAD))

# The same settings as glibc's environment variables, which it reads when a process starts: for a process started
# by someone else (a Ray replica).
ENV_NAMES = {M_ARENA_MAX: "MALLOC_ARENA_MAX", M_MMAP_MAX: "MALLOC_MMAP_MAX_",
             M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", M_TOP_PAD: "MALLOC_TOP_PAD_"}  # fmt: skip
ENVIRONMENT = {ENV_NAMES[param]: str(value) for param, value in TUNING}
# Device nodes without which torch sees no GPU: NVIDIA's, AMD's (ROCm), WSL's.
GPU_NODES = ("/dev/nvidia[0-9]*", "/dev/kfd", "/dev/dxg")

_applied = False


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


def wanted(choice: Literal["auto", "on", "off"], device_type: str) -> bool:
    """Whether to tune: "auto" is on for a CPU device (activations come from malloc), off on CUDA."""
    return choice == "on" or (choice == "auto" and device_type == "cpu")


def cpu_only(device: str) -> bool:
    """Whether the device setting can only mean the CPU here, decided without importing torch (which is too late
    to tune): "cpu", or "auto" on a machine with no GPU device node."""
    kind = device.split(":")[0]
    return kind == "cpu" or (kind == "auto" and not any(glob.glob(pattern) for pattern in GPU_NODES))


def tune_at_start(choice: Literal["auto", "on", "off"], device: str) -> bool:
    """Tune now, first thing in the process, where the device is known to be a CPU without torch; otherwise the
    pipeline tunes when it has resolved the device, later and less well (see the module's doc)."""
    return wanted(choice, "cpu" if cpu_only(device) else "unknown") and tune_allocator()


def tune_allocator() -> bool:
    """Apply ``TUNING`` to this process's glibc malloc (once); False where there is no glibc or it refused."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        log.info("allocator: not glibc, malloc left as it is")
        return False
    if all(os.environ.get(name) == value for name, value in ENVIRONMENT.items()):
        _applied = True  # glibc read the same settings from the environment when this process started
        return True
    if threading.active_count() > 1:
        log.info("allocator: tuned after threads started; those that have their own arena keep it, and their blocks "
                 "of 64 MiB or more still come from mmap")  # fmt: skip
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not all(libc.mallopt(param, value) == 1 for param, value in TUNING):
        log.warning("allocator: glibc refused a malloc setting; malloc may be partly tuned")
        return False
    _applied = True
    log.info("allocator: glibc malloc keeps freed memory (one arena, no mmap, no trim); SD3SERVE_MALLOC_TUNING=off "
             "turns this off")  # fmt: skip
    return True


def is_tuned() -> bool:
    return _applied
