"""glibc's malloc tuned for a server that allocates the same large buffers for every image.

By default glibc serves blocks over its mmap threshold (128 KiB, rising with use up to 32 MiB) with fresh
``mmap`` and returns them with ``munmap``, and trims the heap's free top back to the OS: a VAE decode's
activations are given back after every image and faulted in again, page by page, for the next (thousands of minor
page faults per 512² image, hundreds of thousands at 1024², a third of its CPU). Tuned, the process keeps what it
has used: one arena, no mmap for large blocks, no trimming. The price is memory: the process stays at its peak
RSS instead of dropping back between images (docs/performance.md has the numbers).

Only glibc has ``mallopt``; elsewhere (musl, macOS) nothing is changed. CUDA's memory comes from its own caching
allocator, so on a CUDA device the host allocator is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
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


def tune_allocator() -> bool:
    """Apply ``TUNING`` to this process's glibc malloc (once); False where there is no glibc or it refused."""
    global _applied
    if _applied:
        return True
    libc = _glibc()
    if libc is None:
        log.info("allocator: not glibc, malloc left as it is")
        return False
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
