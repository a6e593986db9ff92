"""Image codecs, adapter files and name lookups off the event loop (the database has its own way: ``Ledger.run`` and
``Ledger.call``)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import ParamSpec, TypeVar

import anyio

P = ParamSpec("P")
T = TypeVar("T")


async def run_blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """``fn(*args, **kwargs)`` on a worker thread (AnyIO's default limiter); its result or its exception."""
    return await anyio.to_thread.run_sync(partial(fn, *args, **kwargs))
