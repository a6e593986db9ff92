"""Engines in async tests: ``async with started(BatchingEngine(settings, model)) as engine:`` starts it and closes
it however the block ends (a gated engine opens its gate first: ``gated.GatedEngine.close``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from sd3serve.engine.protocol import Engine

E = TypeVar("E", bound=Engine)


@contextlib.asynccontextmanager
async def started(engine: E) -> AsyncIterator[E]:
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()
