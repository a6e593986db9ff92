"""The FastAPI application: built in a lifespan, with the engine and stores kept on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi

from sd3serve.api.errors import install_error_handlers
from sd3serve.api.metrics import Metrics
from sd3serve.api.middleware import (
    HeadMiddleware,
    HostMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
)
from sd3serve.api.routes import admin, credits, generate, ops, v2
from sd3serve.api.schemas import openapi_request_schemas
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore
from sd3serve.store.ratelimit import RateLimiter
from sd3serve.store.recovery import Recovery
from sd3serve.store.tasks import TaskStore

log = logging.getLogger(__name__)

# A hold this old with no owner cannot belong to a live request (holds from before owners were recorded).
STALE_HOLD_AGE = timedelta(hours=1)


async def _housekeeping(app: FastAPI, settings: Settings) -> None:
    """Every heartbeat: prove this process alive, settle dead ones, retry deferred refunds, expire results."""
    recovery: Recovery = app.state.recovery
    dead_after = timedelta(seconds=3 * settings.heartbeat_s)
    while True:
        try:
            await run_in_threadpool(recovery.heartbeat)
            await run_in_threadpool(recovery.settle_dead, dead_after=dead_after)
            await run_in_threadpool(app.state.store.retry_deferred)
            await run_in_threadpool(app.state.tasks.delete_expired)
            await run_in_threadpool(recovery.prune_rate_windows, before_window=int(time.time() // 60) - 1)
        except Exception as e:  # the database may be away; try again next beat
            log.warning("housekeeping failed: %s", e)
        await asyncio.sleep(settings.heartbeat_s)


async def _drain(app: FastAPI, grace_s: float) -> None:
    """On shutdown: let v2 tasks already accepted finish for up to ``grace_s``, then fail the rest (refunded)."""
    background: set[asyncio.Task[None]] = app.state.background
    if background:
        log.info("waiting up to %.0f s for %d v2 task(s)", grace_s, len(background))
        _, pending = await asyncio.wait(set(background), timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def _document_400_not_422(spec: dict[str, Any]) -> None:
    """FastAPI documents its parameter errors as 422; this API answers them with 400 ``{"error"}``."""
    error = {
        "description": "Bad input",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
    }
    for operation in (op for path in spec["paths"].values() for op in path.values()):
        responses = operation.get("responses", {})
        default_422 = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
        if default_422.get("$ref", "").endswith("/HTTPValidationError"):
            del responses["422"]
            responses.setdefault("400", error)


def _publish_request_schemas(app: FastAPI) -> None:
    """The generation routes read their bodies themselves (for the 413 and 400 rules): publish their schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(openapi_request_schemas())
            _document_400_not_422(spec)
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(settings: Settings, *, engine: Engine | None = None, store: CreditStore | None = None) -> FastAPI:
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from sd3serve.engine.batching import BatchingEngine

        app.state.store = store or CreditStore(settings.resolved_database_url)
        app.state.tasks = TaskStore(app.state.store.engine)
        app.state.rate_limiter = RateLimiter(app.state.store.engine)
        app.state.recovery = Recovery(app.state.store.engine, app.state.instance_id)
        await run_in_threadpool(app.state.store.create_schema)
        await run_in_threadpool(app.state.recovery.register)
        released = await run_in_threadpool(app.state.store.release_stale_holds, older_than=STALE_HOLD_AGE)
        if released:
            log.warning("returned %d credit holds left by a process that died", released)
        app.state.engine = engine or BatchingEngine(settings, on_batch=metrics.observe_batch)
        app.state.background = set()
        housekeeping = asyncio.create_task(_housekeeping(app, settings), name="housekeeping")
        try:
            await app.state.engine.start()
            yield
        finally:
            await _drain(app, settings.shutdown_grace_s)
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await app.state.engine.close()
            with contextlib.suppress(Exception):
                await run_in_threadpool(app.state.store.retry_deferred)
                await run_in_threadpool(app.state.recovery.unregister)
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
    _publish_request_schemas(app)
    app.add_middleware(RequestBodyMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(HeadMiddleware)
    app.add_middleware(HostMiddleware, public_url=settings.public_url)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # the last added is the outermost
    app.include_router(generate.router)
    app.include_router(v2.router)
    app.include_router(credits.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    return app
