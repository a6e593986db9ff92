"""The FastAPI application: built in a lifespan, with the engine and store kept on ``app.state``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from sd3serve.api.errors import install_error_handlers
from sd3serve.api.middleware import RequestContextMiddleware
from sd3serve.api.routes import credits, generate, ops
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore

log = logging.getLogger(__name__)

# A hold this old cannot belong to a live request: its process died between admission and delivery.
STALE_HOLD_AGE = timedelta(hours=1)


def create_app(settings: Settings, *, engine: Engine | None = None, store: CreditStore | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from sd3serve.engine.local import LocalEngine

        app.state.store = store or CreditStore(settings.resolved_database_url)
        await run_in_threadpool(app.state.store.create_schema)
        released = await run_in_threadpool(app.state.store.release_stale_holds, older_than=STALE_HOLD_AGE)
        if released:
            log.warning("returned %d credit holds left by a process that died", released)
        app.state.engine = engine or LocalEngine(settings)
        try:
            await app.state.engine.start()
            yield
        finally:
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
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware)
    app.include_router(generate.router)
    app.include_router(credits.router)
    app.include_router(ops.router)
    return app
