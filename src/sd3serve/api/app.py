"""The FastAPI application: built in a lifespan, with the engine and stores kept on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from sd3serve.api.errors import install_error_handlers
from sd3serve.api.metrics import Metrics
from sd3serve.api.middleware import RequestContextMiddleware
from sd3serve.api.routes import credits, generate, ops, v2
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore
from sd3serve.store.tasks import TaskStore

log = logging.getLogger(__name__)

# A hold this old cannot belong to a live request: its process died between admission and delivery.
STALE_HOLD_AGE = timedelta(hours=1)
CLEANUP_INTERVAL_S = 60.0


async def _cleanup_loop(tasks: TaskStore) -> None:
    while True:
        try:
            deleted = await run_in_threadpool(tasks.delete_expired)
            if deleted:
                log.info("deleted %d expired v2 results", deleted)
        except Exception:
            log.warning("could not delete expired v2 results", exc_info=True)
        await asyncio.sleep(CLEANUP_INTERVAL_S)


def create_app(settings: Settings, *, engine: Engine | None = None, store: CreditStore | None = None) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from sd3serve.engine.batching import BatchingEngine

        app.state.store = store or CreditStore(settings.resolved_database_url)
        app.state.tasks = TaskStore(app.state.store.engine)
        await run_in_threadpool(app.state.store.create_schema)
        released = await run_in_threadpool(app.state.store.release_stale_holds, older_than=STALE_HOLD_AGE)
        if released:
            log.warning("returned %d credit holds left by a process that died", released)
        app.state.engine = engine or BatchingEngine(settings, on_batch=metrics.observe_batch)
        app.state.background = set()
        cleanup = asyncio.create_task(_cleanup_loop(app.state.tasks), name="v2-cleanup")
        try:
            await app.state.engine.start()
            yield
        finally:
            cleanup.cancel()
            for task in list(app.state.background):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(cleanup, *app.state.background, return_exceptions=True)
            await app.state.engine.close()
            if store is None:
                app.state.store.close()

    app = FastAPI(
        title="sd3serve",
        summary="Stable Diffusion 3.5 Turbo text-to-image, with the hosted API of Segmind",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.instance_id = uuid.uuid4().hex
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)
    app.include_router(generate.router)
    app.include_router(v2.router)
    app.include_router(credits.router)
    app.include_router(ops.router)
    return app
