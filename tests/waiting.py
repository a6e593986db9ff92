"""Waiting for a condition in tests that drive servers and processes: poll, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float = 90) -> T:
    """The first truthy value of ``condition()``, polled every 20 ms; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached in {timeout:g} s")
        time.sleep(0.02)
