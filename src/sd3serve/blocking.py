"""The one way blocking work leaves the event loop: database calls, image codecs and name lookups run on the
thread pool (Starlette's, bounded by AnyIO's limiter), so that the loop only ever waits on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from starlette.concurrency import run_in_threadpool

P = ParamSpec("P")
T = TypeVar("T")


async def run_blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a worker thread; its result or its exception."""
    return await run_in_threadpool(fn, *args, **kwargs)
