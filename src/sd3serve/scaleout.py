"""Scale out on Ray Serve: the whole app (``create_app``) as the ingress of every replica, one replica per GPU.

Each replica is a complete server process: its own engine, the shared ledger (PostgreSQL), its own heartbeat in
``instances``. Ray places replicas (``num_gpus: 1``, ``num_cpus``), routes each HTTP request to the less loaded
of two replicas, queues past ``max_ongoing_requests`` and answers 503 with ``Retry-After`` past
``max_queued_requests``, autoscales on ongoing requests and restarts a dead replica; the ledger's recovery
(store/recovery.py) returns a dead replica's holds and fails its v2 tasks, as it does for any dead process.

A v2 task is accepted (task row and hold) by the replica that Ray routed its submission to, and runs on the
replica that Ray routes a deployment-handle call to (scaleout_tasks.py): the autoscaler and the router see it as
an ongoing request there. Every replica answers reads from the database.
A small ``ReplicaBoard`` deployment collects what each replica reports every heartbeat (readiness, queue, its
metrics): ``/metrics`` on any replica answers for all of them with a ``replica`` label, and ``/readyz`` says how
many are ready.

``sd3serve serve --replicas N`` runs this on one machine; ``serve run`` / ``serve deploy`` of
``deploy/serve-config.yaml`` (``import_path: sd3serve.scaleout:app_builder``) runs it on a Ray cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sd3serve import allocator
from sd3serve.settings import Settings
from sd3serve.threads import available_cores, configure_threads, thread_report

log = logging.getLogger(__name__)

APP_NAME = "sd3serve"
HEALTH_APP = "sd3serve-health"  # /healthz, answered without a model (see Liveness)
REPLICA_HEADER = "x-sd3serve-replica"
# Requests Ray sends one replica before it queues them at the proxy. Cheap ones (status reads, credits, /metrics)
# count too, so it is well above the one batch the engine runs at a time; past it, and past the engine's own
# queue, requests wait for whichever replica frees up first.
MAX_ONGOING_REQUESTS = 16
RETRY_AFTER_S = 5
QUIET = {"enable_access_log": False}  # the app writes its own access log (api/middleware.py)


class SQLiteAcrossHosts(RuntimeError):
    """A replica on another host than the SQLite file: it would keep a ledger of its own."""


def check_database(database_url: str, *, origin_node: str | None, this_node: str) -> None:
    """Refuse a SQLite ledger on a replica away from the node that built the app (where the file is)."""
    if database_url.startswith("sqlite") and origin_node is not None and this_node != origin_node:
        raise SQLiteAcrossHosts(
            f"this replica runs on Ray node {this_node}, not on the node that holds the SQLite ledger "
            f"({database_url}): replicas on several hosts need one shared ledger; set SD3SERVE_DATABASE_URL to "
            "postgresql://user@host/db"
        )


# --- what replicas report -------------------------------------------------------------------------------------


@dataclass
class ReplicaReport:
    replica: str
    node: str
    pid: int
    ready: bool
    instance: str = ""  # the ledger's id of this process (owner of its holds and tasks)
    queued: int = 0
    running: int = 0
    package: str = ""  # the sd3serve this replica imported (tests check it is the checkout under test)
    threads: dict[str, Any] = field(default_factory=dict)  # threads.thread_report(), and whether torch came first
    metrics: list[Metric] = field(default_factory=list)
    at: float = 0.0  # set by the board, on its clock


class ReplicaBoard:
    """What each replica last reported; reports older than ``max_age_s`` are of replicas gone."""

    def __init__(self) -> None:
        self._reports: dict[str, ReplicaReport] = {}

    def push(self, report: ReplicaReport) -> None:
        report.at = time.monotonic()
        self._reports[report.replica] = report

    def drop(self, replica: str) -> None:
        self._reports.pop(replica, None)

    def snapshot(self, max_age_s: float) -> list[ReplicaReport]:
        now = time.monotonic()
        for name in [n for n, r in self._reports.items() if now - r.at > max_age_s]:
            del self._reports[name]
        return sorted(self._reports.values(), key=lambda r: r.replica)


def labelled(families: list[Metric], replica: str) -> list[Metric]:
    """The families with a ``replica`` label on every sample."""
    out = []
    for family in families:
        m = Metric(family.name, family.documentation, family.type, family.unit)
        m.samples = [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
        out.append(m)
    return out


def merged(reports: list[ReplicaReport]) -> bytes:
    """One Prometheus exposition of every replica's families (one family per name, samples side by side)."""
    families: dict[str, Metric] = {}
    for report in reports:
        for family in report.metrics:
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            into.samples.extend(family.samples)

    class Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    return generate_latest(Collected())


class ReplicaHeader:
    """Names the replica that answered, on every response (``x-sd3serve-replica``)."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header)


# --- the replica ----------------------------------------------------------------------------------------------


class SD3Replica:
    """One engine and the whole API. Ray builds the app after ``__init__`` (``__serve_build_asgi_app__``) and runs
    its lifespan (which loads the model) before it routes anything here."""

    def __init__(self, settings: dict[str, Any], board: DeploymentHandle, origin_node: str | None = None) -> None:
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        self.settings = Settings(**settings)
        torch_first = "torch" in sys.modules  # then OMP_WAIT_POLICY would come too late
        check_database(self.settings.resolved_database_url, origin_node=origin_node, this_node=self.node)
        if not self.settings.threads:  # torch's threads: the CPUs Ray gave this replica
            cpus = int(ray.get_runtime_context().get_assigned_resources().get("CPU", 0))
            self.settings = self.settings.model_copy(update={"threads": cpus or available_cores()})
        configure_threads(self.settings)  # before the app imports torch
        self.threads = {**thread_report(), "torch_imported_before": torch_first}
        self.board = board
        self.api: FastAPI | None = None
        self._handle: DeploymentHandle | None = None  # this deployment's, for v2 tasks
        self._reporter = asyncio.get_running_loop().create_task(self._report_forever(), name="replica-report")

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from sd3serve.api.app import create_app
        from sd3serve.scaleout_tasks import HandleDispatch

        app = create_app(self.settings, start_in_background=False)  # Ray routes here once the lifespan ran
        replace_route(app, "/metrics", self._metrics, "Prometheus metrics of every replica, labelled `replica`")
        replace_route(app, "/readyz", self._readyz, "Readiness: this replica's model is loaded; replicas ready")
        started = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
            async with started(a) as st:
                state = self._state()
                state.service.dispatch = HandleDispatch(self._deployment, state.service,
                                                        lambda: state.ledger.instance_id)  # fmt: skip
                yield st

        app.router.lifespan_context = lifespan
        self.api = app
        return ReplicaHeader(app, self.replica)

    def _deployment(self) -> DeploymentHandle:
        if self._handle is None:
            ctx = serve.get_replica_context()
            self._handle = serve.get_deployment_handle(ctx.deployment, app_name=ctx.app_name)
        return self._handle

    async def run_task(self, hold: Any, owner: str, order: Any, task_id: str) -> None:
        """A v2 task accepted by a replica (maybe this one), routed here by Ray: take it over and run it."""
        from sd3serve.scaleout_tasks import run_dispatched

        state = self._state()
        if state is None:
            raise RuntimeError("the application has not started")
        await run_dispatched(state.service, owner=owner, hold=hold, order=order, task_id=task_id)

    async def check_health(self) -> None:
        """Ray's health check: a replica whose engine stopped is restarted."""
        state = self._state()
        if state is None:
            raise RuntimeError("the application has not started")
        await state.model_engine.check_health()

    def _state(self) -> Any:
        return getattr(self.api.state, "sd3", None) if self.api is not None else None

    def _report(self) -> ReplicaReport:
        import sd3serve

        state = self._state()
        report = ReplicaReport(replica=self.replica, node=self.node, pid=os.getpid(), ready=False,
                               package=sd3serve.__file__ or "", threads=self.threads)  # fmt: skip
        if state is not None:
            stats = state.model_engine.stats()
            state.metrics.observe_engine(stats)
            report.ready, report.queued, report.running = stats.ready, stats.queued, stats.running
            report.instance = state.ledger.instance_id
            report.metrics = labelled(list(state.metrics.registry.collect()), self.replica)
        return report

    async def _report_forever(self) -> None:
        while True:
            try:
                await self.board.push.remote(self._report())
            except Exception as e:  # the board restarts; report again next beat
                log.warning("could not report to the replica board: %s", e)
            await asyncio.sleep(self.settings.heartbeat_s)

    async def _reports(self) -> list[ReplicaReport]:
        await self.board.push.remote(self._report())  # this replica's figures are fresh
        reports: list[ReplicaReport] = await self.board.snapshot.remote(3 * self.settings.heartbeat_s)
        return reports

    async def _metrics(self) -> Response:
        return Response(merged(await self._reports()), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def _readyz(self) -> JSONResponse:
        reports = await self._reports()
        replicas = {"ready": sum(r.ready for r in reports), "starting": sum(not r.ready for r in reports)}
        try:
            await self.check_health()
        except Exception as e:
            return JSONResponse({"status": "unhealthy", "error": str(e), "replicas": replicas}, status_code=503)
        return JSONResponse({"status": "ready", "replicas": replicas})


def replace_route(app: FastAPI, path: str, endpoint: Any, summary: str) -> None:
    """Answer ``GET path`` with ``endpoint``: the route goes first, so it matches before the app's own (which
    stays in the OpenAPI schema: same path, same shape)."""
    app.add_api_route(path, endpoint, methods=["GET"], summary=summary, include_in_schema=False)
    app.router.routes.insert(0, app.router.routes.pop())


# --- liveness while the replicas start ------------------------------------------------------------------------


class Liveness:
    """``/healthz`` of the cluster, from a deployment without a model behind its own route (Ray's proxy takes the
    longest matching prefix): it answers while the model replicas start, restart or are scaled to zero, when the
    app's own ``/healthz`` has no replica to run on. Readiness stays with ``/readyz``, on the replicas."""

    async def __call__(self, request: Any) -> JSONResponse:
        return JSONResponse({"status": "ok"})


def health_app() -> serve.Application:
    return serve.deployment(Liveness, ray_actor_options={"num_cpus": 0}, logging_config=QUIET).bind()


def health_builder(_args: dict[str, Any]) -> serve.Application:
    """For ``serve run`` / ``serve deploy``: the second application of deploy/serve-config.yaml."""
    return health_app()


# --- building and running the application -------------------------------------------------------------------


def overrides(settings: Settings) -> dict[str, Any]:
    """The settings that differ from the defaults, as keyword arguments of ``Settings`` for the replicas."""
    defaults = Settings.model_construct()
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name == "data_dir" or value != getattr(defaults, name, None):
            out[name] = value.get_secret_value() if name == "admin_key" and value is not None else value
    return out


def replica_options(settings: Settings, *, replicas: int, num_cpus: float, num_gpus: float) -> dict[str, Any]:
    actor: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if allocator.wanted(settings.malloc_tuning, "cuda" if num_gpus else "cpu"):
        # Ray starts the replica's process with threads of its own, which mallopt would come too late for
        actor["runtime_env"] = {"env_vars": dict(allocator.ENVIRONMENT)}
    return {
        "num_replicas": replicas,
        "ray_actor_options": actor,
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "max_queued_requests": settings.max_queue,
        "backpressure_config": {"retry_after_s": RETRY_AFTER_S},
        "graceful_shutdown_timeout_s": settings.shutdown_grace_s + 10,
        "logging_config": QUIET,
    }


def build_app(settings: Settings, *, options: dict[str, Any] | None = None) -> serve.Application:
    """The Serve application: the replicas (the ingress) and their board."""
    board = serve.deployment(ReplicaBoard, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                             logging_config=QUIET)  # fmt: skip
    replica = serve.deployment(serve.ingress()(SD3Replica), name="SD3Replica")
    origin = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    if options:
        replica = replica.options(**options)
    return replica.bind(overrides(settings), board.bind(), origin)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """For ``serve run`` / ``serve deploy``: ``args`` are settings (``database_url``, ``model``, ...); replica
    counts, resources and autoscaling come from the config's ``deployments`` section."""
    settings = Settings(**args)
    return build_app(settings)


# Ray's settings for a cluster that ``sd3serve serve --replicas`` starts itself (one machine, where Ray's own
# processes share the cores with the model): workers at nice 0 (Ray starts them at nice 15, so the replica, a whole
# server, got the CPU only when nothing else wanted it), the request path without its two extra event-loop hops in
# each process (user code and the router on the actor's own loop, as Ray's "throughput optimized" mode has them; its
# direct ingress stays off, as it would take port 8000 whatever --port says), and the controller's reconciliation
# every 0.5 s instead of 0.1 s (its CPU was the largest of Ray's idle processes). Set in the environment before Ray
# starts, so every Ray process inherits them; a value already in the environment wins. docs/scale-out.md has the
# measurements.
LOCAL_RAY_ENV = {
    "RAY_worker_niceness": "0",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
}


def serve_forever(settings: Settings, *, replicas: int) -> int:
    """``sd3serve serve --replicas N``: a local Ray cluster (or ``RAY_ADDRESS``'s), N replicas, until SIGTERM."""
    if "RAY_ADDRESS" not in os.environ:
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    ray.init(address=os.environ.get("RAY_ADDRESS", "local"), num_cpus=None if "RAY_ADDRESS" in os.environ
             else available_cores(), include_dashboard=False)  # fmt: skip
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpus = settings.device == "cuda" or (settings.device == "auto" and gpus > 0)
        if use_gpus and gpus < replicas:
            print(f"error: {replicas} replicas need {replicas} GPUs; this cluster has {gpus}", file=sys.stderr)
            return 2
        cpus = int(ray.cluster_resources().get("CPU", 1))
        num_cpus = settings.threads or max(1, cpus // replicas)
        options = replica_options(settings, replicas=replicas, num_cpus=num_cpus, num_gpus=1 if use_gpus else 0)
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(health_app(), name=HEALTH_APP, route_prefix="/healthz")  # live before the models load
        serve.run(build_app(settings, options=options), name=APP_NAME, route_prefix="/")
        log.info("serving on http://%s:%d with %d replica(s), %s CPU each%s", settings.host, settings.port,
                 replicas, num_cpus, " and one GPU" if use_gpus else "")  # fmt: skip
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # only now: Ray's processes must not inherit the mask
        signal.sigwait(stop)
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    return 0
