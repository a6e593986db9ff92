"""Engines in async tests: ``async with started(BatchingEngine(settings, model)) as engine:`` starts it and closes
it however the block ends (a gated engine opens its gate first: ``gated.GatedEngine.close``); ``held`` keeps a
gated engine's batch running for as long as the test wants."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from gated import GatedEngine
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.protocol import Engine

E = TypeVar("E", bound=Engine)


@contextlib.asynccontextmanager
async def started(engine: E) -> AsyncIterator[E]:
    await engine.start()
    try:
        yield engine
    finally:
        await engine.close()


async def held(engine: GatedEngine, job: GenerationJob, request_id: str = "running") -> asyncio.Task[object]:
    """``job`` taken by the started ``engine``'s worker and held there (its gate shut) until the test opens the gate:
    what comes next waits in the queue. Its task, once in flight (its error, had it failed instead)."""
    engine.gate.clear()
    running: asyncio.Task[object] = asyncio.create_task(engine.generate(job, request_id=request_id))
    while not engine.in_flight:  # until the worker has taken it
        if running.done():
            await running  # it failed instead: raise its error rather than wait for ever
        await asyncio.sleep(0.01)
    return running
