"""The FastAPI application: built in a lifespan, with the engine and stores kept on ``app.state``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.utils import get_openapi
from sqlalchemy.engine import make_url

from sd3serve.api.docs import document_api, install_docs
from sd3serve.api.errors import install_error_handlers
from sd3serve.api.metrics import Metrics
from sd3serve.api.middleware import (
    HeadMiddleware,
    HostMiddleware,
    RequestBodyMiddleware,
    RequestContextMiddleware,
)
from sd3serve.api.routes import admin, credits, events, generate, img2img, loras, openai, ops, playground, v2
from sd3serve.api.routes import webhooks as webhooks_routes
from sd3serve.api.routes.img2img import IMAGE_INPUT_PATHS
from sd3serve.api.schemas import openapi_request_schemas
from sd3serve.api.service import GenerationService
from sd3serve.api.state import AppState
from sd3serve.api.streams import StreamHub, stream_limit
from sd3serve.api.webhook_delivery import webhook_loop
from sd3serve.engine.protocol import Engine
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore
from sd3serve.store.idempotency import IdempotencyStore
from sd3serve.store.ratelimit import RateLimiter
from sd3serve.store.recovery import Heartbeat, Recovery, dedicated_engine
from sd3serve.store.tasks import TaskStore
from sd3serve.store.webhooks import WebhookStore

log = logging.getLogger(__name__)

PRESUMED_DEAD = "this server was presumed dead by another process; the request's hold was returned, retry"


def _start_heartbeat(state: AppState, recovery: Recovery) -> Heartbeat:
    """This process's heartbeat, on a thread and a database connection of its own (store/recovery.py); when a beat
    learns that the process was presumed dead, what it still runs is stopped on the event loop."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        stopped = state.engine.abort_all(PRESUMED_DEAD)
        log.error("presumed dead by another process: stopped %d request(s); their holds were returned", stopped)

    def presumed_dead() -> None:  # called on the heartbeat's thread
        loop.call_soon_threadsafe(stop_all)

    heartbeat = Heartbeat(recovery, state.settings.heartbeat_s, on_presumed_dead=presumed_dead)
    heartbeat.start()
    return heartbeat


async def _housekeeping(state: AppState) -> None:
    """Every heartbeat period: settle dead processes, stop tasks cancelled elsewhere, retry deferred refunds, expire
    results. (The heartbeat itself runs on its own thread: ``_start_heartbeat``.)"""
    settings, recovery = state.settings, state.recovery
    dead_after = timedelta(seconds=3 * settings.heartbeat_s)
    while True:
        try:
            await run_in_threadpool(recovery.settle_dead, dead_after=dead_after)
            await state.service.stop_cancelled()
            await run_in_threadpool(state.store.retry_deferred)
            expired = await run_in_threadpool(state.tasks.delete_expired)
            expired += await run_in_threadpool(state.idempotency.delete_expired)
            if expired:
                await run_in_threadpool(state.store.reclaim)
            await run_in_threadpool(recovery.prune_rate_windows, before_window=int(time.time() // 60) - 1)
        except Exception as e:  # the database may be away; try again next beat
            log.warning("housekeeping failed: %s", e)
        await asyncio.sleep(settings.heartbeat_s)


async def _start_engine(state: AppState, *, on_failure: Callable[[BaseException], None] | None) -> None:
    """Load and warm the model while HTTP already answers; say when it is ready, or why it failed."""
    started = time.perf_counter()
    try:
        await state.engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        from sd3serve.engine.loading import ModelLoadError  # torch is loaded by now

        log.critical("the model could not be loaded: %s", e, exc_info=not isinstance(e, ModelLoadError))
        if on_failure is not None:
            on_failure(e)
        return
    log.info("model ready in %.1f s: generation requests are served (/readyz: ready)", time.perf_counter() - started)


def _log_start(state: AppState, *, background: bool) -> None:
    """Where things are, for a person reading the log: data, database, pages, and how to get a first key."""
    settings = state.settings
    url = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = settings.public_url.rstrip("/") if settings.public_url else f"http://{host}:{settings.port}"
    log.info("data dir %s; database %s", settings.data_dir, url)
    log.info("playground %s/ ; API docs %s/docs ; readiness %s/readyz", base, base, base)
    if background:
        log.info("loading the model in the background; until it is ready /readyz answers 503 loading")
    if not state.store.list_keys():
        where = f"--database-url '{url}'" if settings.database_url else f"--data-dir '{settings.data_dir}'"
        log.warning("no API key exists yet: create one with `sd3serve keys %s create --credits 100`", where)


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
            document_api(spec)
            schemas.pop("HTTPValidationError", None)
            schemas.pop("ValidationError", None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    store: CreditStore | None = None,
    on_start_failure: Callable[[BaseException], None] | None = None,
    start_in_background: bool = True,
) -> FastAPI:
    """The app; ``engine`` and ``store`` may be given (tests), else they are built from the settings.

    With ``start_in_background`` HTTP answers while the model loads, and ``on_start_failure`` is called if it
    cannot be loaded (``serve`` stops the server then); without it the lifespan loads the model before the app
    takes requests, and a failed load fails the start (for hosts that route only to started apps)."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from sd3serve.engine.batching import BatchingEngine

        credit_store = store or CreditStore(settings.resolved_database_url)
        tasks = TaskStore(credit_store.engine)
        idempotency = IdempotencyStore(credit_store.engine)
        webhooks = WebhookStore(credit_store.engine)
        beat_engine = dedicated_engine(credit_store.engine)
        recovery = Recovery(credit_store.engine, heartbeat_engine=beat_engine)
        await run_in_threadpool(credit_store.create_schema)
        await run_in_threadpool(recovery.register)
        the_engine = engine or BatchingEngine(settings, on_batch=metrics.observe_batch)
        state = AppState(
            settings=settings, metrics=metrics, store=credit_store, tasks=tasks, idempotency=idempotency,
            webhooks=webhooks, rate_limiter=RateLimiter(credit_store.engine), recovery=recovery, engine=the_engine,
            service=GenerationService(engine=the_engine, store=credit_store, tasks=tasks, idempotency=idempotency,
                                      webhooks=webhooks, recovery=recovery, settings=settings, metrics=metrics),
            streams=StreamHub(tasks, per_key=settings.max_streams_per_key, total=stream_limit(settings)),
        )  # fmt: skip
        app.state.sd3 = state
        heartbeat = _start_heartbeat(state, recovery)
        housekeeping = asyncio.create_task(_housekeeping(state), name="housekeeping")
        stream_poller = asyncio.create_task(state.streams.run(), name="stream-hub")
        deliveries = asyncio.create_task(
            webhook_loop(webhooks, owner=recovery.instance_id, settings=settings), name="webhooks"
        )
        await run_in_threadpool(_log_start, state, background=start_in_background)
        starting = None
        if start_in_background:  # HTTP first, the model after: /readyz says "loading" until the engine is ready
            starting = asyncio.create_task(_start_engine(state, on_failure=on_start_failure), name="engine-start")
        try:
            if starting is None:
                await the_engine.start()
            yield
        finally:
            if starting is not None:
                starting.cancel()  # a load still in progress: the engine's close() waits for its thread
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            await state.service.drain(settings.shutdown_grace_s)
            for loop_task in (housekeeping, deliveries, stream_poller):
                loop_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loop_task
            await the_engine.close()
            await run_in_threadpool(heartbeat.stop)  # no beat may re-register after the unregister below
            with contextlib.suppress(Exception):
                await run_in_threadpool(credit_store.retry_deferred)
                await run_in_threadpool(recovery.unregister)
            if beat_engine is not credit_store.engine:
                beat_engine.dispose()
            if store is None:
                credit_store.close()

    app = FastAPI(
        title="sd3serve",
        summary="Stable Diffusion 3.5 Turbo text-to-image, with the hosted API of Segmind",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # api/docs.py serves them, with local assets
    )
    install_error_handlers(app)
    install_docs(app)
    _publish_request_schemas(app)
    app.add_middleware(
        RequestBodyMiddleware, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s,
        larger=dict.fromkeys(IMAGE_INPUT_PATHS, max(settings.max_body_bytes, settings.max_image_body_bytes)),
    )  # fmt: skip
    app.add_middleware(HeadMiddleware)
    app.add_middleware(HostMiddleware, public_url=settings.public_url)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)  # the last added is the outermost
    app.include_router(generate.router)
    app.include_router(v2.router)
    app.include_router(img2img.router)
    app.include_router(loras.router)
    app.include_router(events.router)
    app.include_router(webhooks_routes.router)
    app.include_router(openai.router)
    app.include_router(credits.router)
    app.include_router(ops.router)
    app.include_router(admin.router)
    app.include_router(playground.router)
    return app
