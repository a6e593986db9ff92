"""The service, assembled and running: the ledger, the model engine and what runs beside requests (the heartbeat,
housekeeping, the stream poller, webhook delivery), started and stopped in one place.

``running()`` is what the app's lifespan enters; :class:`Services` is what routes reach through ``api/deps.py``.
The routes use the services (generation, reads, accounts, streams, health); the parts those are made of (the model
engine, the ledger) are kept here for the scale-out replica and for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.engine import make_url

from sd3serve.blocking import run_blocking
from sd3serve.engine.lora_names import adapter_files, lora_dir
from sd3serve.engine.protocol import Engine
from sd3serve.ledger import Database, Ledger
from sd3serve.ledger.recovery import Heartbeat
from sd3serve.service.accounts import Accounts
from sd3serve.service.generation import GenerationService
from sd3serve.service.metrics import Metrics
from sd3serve.service.reads import TaskReads
from sd3serve.service.streams import StreamHub, stream_limit
from sd3serve.service.webhook_delivery import webhook_loop
from sd3serve.settings import Settings

log = logging.getLogger(__name__)

PRESUMED_DEAD = "this server was presumed dead by another process; the request's hold was returned, retry"


@dataclass(frozen=True)
class Services:
    settings: Settings
    metrics: Metrics
    service: GenerationService  # orders in, results out (v1, v2, image-to-image, OpenAI)
    reads: TaskReads
    accounts: Accounts
    streams: StreamHub
    # What the services are made of
    model_engine: Engine
    ledger: Ledger

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, body of /readyz): loading until the model is loaded and warm; unhealthy if a check fails."""
        if not self.model_engine.is_ready:
            return False, {"status": "loading"}
        try:
            await self.model_engine.check_health()
        except Exception as e:
            return False, {"status": "unhealthy", "error": str(e)}
        return True, {"status": "ready"}

    def render_metrics(self) -> bytes:
        """The Prometheus exposition, with the engine's figures of now."""
        self.metrics.observe_engine(self.model_engine.stats())
        return self.metrics.render()

    async def adapters(self) -> dict[str, int]:
        """The LoRA adapters requests may name, with the size of each file."""
        files = await run_blocking(adapter_files, lora_dir(self.settings))
        return {name: path.stat().st_size for name, path in files.items()}


@contextlib.asynccontextmanager
async def running(
    settings: Settings, *, metrics: Metrics, model_engine: Engine | None = None, database: Database | None = None,
    start_in_background: bool = True, on_start_failure: Callable[[BaseException], None] | None = None,
) -> AsyncIterator[Services]:  # fmt: skip
    """The services, from start to drain. ``model_engine`` and ``database`` may be given (tests; the database is
    then left open), else they are built from the settings. With ``start_in_background`` the model loads while the
    services already answer (readiness says loading), and ``on_start_failure`` hears if it cannot; without it, the
    model is loaded before this yields."""
    from sd3serve.engine.batching import BatchingEngine

    ledger = Ledger(database, owns=False) if database is not None else Ledger.open(settings.resolved_database_url)
    try:
        await ledger.call(ledger.start)
    except BaseException:
        ledger.close()
        raise
    the_engine = model_engine or BatchingEngine(settings, on_batch=metrics.observe_batch)
    services = Services(
        settings=settings, metrics=metrics,
        service=GenerationService(model_engine=the_engine, ledger=ledger, settings=settings, metrics=metrics),
        reads=TaskReads(ledger, the_engine), accounts=Accounts(ledger, settings),
        streams=StreamHub(ledger, per_key=settings.max_streams_per_key, total=stream_limit(settings)),
        model_engine=the_engine, ledger=ledger,
    )  # fmt: skip
    heartbeat = _start_heartbeat(services)
    loops = [
        asyncio.create_task(_housekeeping(services), name="housekeeping"),
        asyncio.create_task(services.streams.run(), name="stream-hub"),
        asyncio.create_task(webhook_loop(ledger, settings=settings), name="webhooks"),
    ]
    _log_start(services, background=start_in_background, no_keys=await ledger.run(lambda tx: not tx.keys.all()))
    starting = None
    if start_in_background:  # answer first, the model after: readiness says "loading" until the engine is ready
        starting = asyncio.create_task(_start_engine(services, on_failure=on_start_failure), name="engine-start")
    try:
        if starting is None:
            await the_engine.start()
        yield services
    finally:
        if starting is not None:
            starting.cancel()  # a load still in progress: the engine's close() waits for its thread
            with contextlib.suppress(asyncio.CancelledError):
                await starting
        await services.service.drain(settings.shutdown_grace_s)
        for loop_task in loops:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
        await the_engine.close()
        await run_blocking(heartbeat.stop)  # no beat may re-register after the unregister below
        with contextlib.suppress(Exception):
            await ledger.call(ledger.stop)
        ledger.close()


def _start_heartbeat(services: Services) -> Heartbeat:
    """This process's heartbeat, on a thread and a database connection of its own (ledger/recovery.py); when a beat
    learns that the process was presumed dead, what it still runs is stopped on the event loop."""
    loop = asyncio.get_running_loop()

    def stop_all() -> None:
        stopped = services.model_engine.abort_all(PRESUMED_DEAD)
        log.error("presumed dead by another process: stopped %d request(s); their holds were returned", stopped)

    def presumed_dead() -> None:  # called on the heartbeat's thread
        loop.call_soon_threadsafe(stop_all)

    heartbeat = Heartbeat(services.ledger, services.settings.heartbeat_s, on_presumed_dead=presumed_dead)
    heartbeat.start()
    return heartbeat


async def _housekeeping(services: Services) -> None:
    """Every heartbeat period: the ledger's housekeeping (``Ledger.housekeep``), and the tasks running here that
    were cancelled through another process stopped. (The heartbeat itself runs on its own thread.)"""
    settings = services.settings
    dead_after = timedelta(seconds=3 * settings.heartbeat_s)
    while True:
        try:
            await services.ledger.call(services.ledger.housekeep, dead_after=dead_after)
            await services.service.stop_cancelled()
        except Exception as e:  # the database may be away; try again next beat
            log.warning("housekeeping failed: %s", e)
        await asyncio.sleep(settings.heartbeat_s)


async def _start_engine(services: Services, *, on_failure: Callable[[BaseException], None] | None) -> None:
    """Load and warm the model while HTTP already answers; say when it is ready, or why it failed."""
    started = time.perf_counter()
    try:
        await services.model_engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as e:
        from sd3serve.engine.loading import ModelLoadError  # torch is loaded by now

        log.critical("the model could not be loaded: %s", e, exc_info=not isinstance(e, ModelLoadError))
        if on_failure is not None:
            on_failure(e)
        return
    log.info("model ready in %.1f s: generation requests are served (/readyz: ready)", time.perf_counter() - started)


def _log_start(services: Services, *, background: bool, no_keys: bool) -> None:
    """Where things are, for a person reading the log: data, database, pages, and how to get a first key."""
    settings = services.settings
    url = make_url(settings.resolved_database_url).render_as_string(hide_password=True)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    base = settings.public_url.rstrip("/") if settings.public_url else f"http://{host}:{settings.port}"
    log.info("data dir %s; database %s", settings.data_dir, url)
    log.info("playground %s/ ; API docs %s/docs ; readiness %s/readyz", base, base, base)
    if background:
        log.info("loading the model in the background; until it is ready /readyz answers 503 loading")
    if no_keys:
        where = f"--database-url '{url}'" if settings.database_url else f"--data-dir '{settings.data_dir}'"
        log.warning("no API key exists yet: create one with `sd3serve keys %s create --credits 100`", where)
