"""What the Ray test modules share: one local Ray cluster and Serve instance for the whole session (started by
the first Ray test, stopped after the last), a PostgreSQL database per module and its application's settings, an
application per module (deleted when the module ends; ``RayApp``: its address and ledger), the replica board of an
application, the replica counts Serve reports, and the request bodies and paths the modules send.

The session's cluster is one head node (2 CPUs and one ``slot``, which test_ray_nodes.py uses to place one
replica per node), Serve's proxy on the head only (a second node started on this machine would bind the same
port), and the model-free ``/healthz`` app. Each module deploys its own application under its own settings and
deletes it at the end, so that the next module finds the cluster's CPUs free.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

import sd3serve
from helpers.ledger import Store, open_store
from helpers.postgres import database_url, pg_database
from live_server import SMALL, free_port
from sd3serve.ledger.schema import Task
from sd3serve.settings import Settings

try:
    from sd3serve.scaleout import LOCAL_RAY_ENV
except ImportError:  # Ray is not installed: the Ray tests skip themselves
    LOCAL_RAY_ENV = {}

SRC = Path(sd3serve.__file__).parents[1]
# Serve's proxy sends requests to replicas on its own node while they have room: with two nodes, the reads that
# must reach the second node's replica would never leave the head. Spread them (the proxy reads this at start).
PREFER_LOCAL = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"
# Routers keep each replica's queue length for 10 s and choose by it: a test that needs "the idle replica gets the
# next run" has its replicas' routers probe the lengths at every choice (``PROBE_EVERY_TIME``, in the replicas'
# runtime_env: the proxy's router keeps its cache, whose probes miss their 0.1 s deadline on a loaded machine).
QUEUE_CACHE = "RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S"
# Workers of a local cluster get the driver's environment: the replicas import this checkout's sd3serve.
RAY_ENV = {
    "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    "HF_HUB_OFFLINE": "1",
    PREFER_LOCAL: "0",
}
# What every process of the cluster inherits from its raylet: Ray as `sd3serve serve --replicas` configures it
# (workers at nice 0, ...), and the proxy's routing above.
CLUSTER_ENV = {**LOCAL_RAY_ENV, PREFER_LOCAL: "0"}
PROBE_EVERY_TIME = {"env_vars": {**RAY_ENV, QUEUE_CACHE: "0"}}
HEAD_CPUS = 2
OBJECT_STORE = 100 * 2**20

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
HEARTBEAT_S = 2.0  # a replica silent for 3 heartbeats is dead: under load here, 1.5 s is not enough
WORK = {**SMALL, "width": 512, "height": 512, "steps": 30}


@dataclass
class RayCluster:
    """The session's local Ray: Serve's HTTP address, the head node and the GCS address to join it."""

    url: str
    head: str
    gcs: str


_cluster: RayCluster | None = None


def shared_cluster() -> RayCluster:
    """The session's cluster, started on first use: Ray (``HEAD_CPUS``, one ``slot``), Serve on a free port with
    its proxy on the head only, and the model-free ``/healthz`` application."""
    global _cluster
    if _cluster is not None:
        return _cluster
    import ray
    from ray import serve

    from sd3serve.scaleout import HEALTH_APP, health_app

    saved = {name: os.environ.get(name) for name in CLUSTER_ENV}
    os.environ.update(CLUSTER_ENV)  # the raylet, so every worker (Serve's proxy too), inherits them
    try:
        start_ray(num_cpus=HEAD_CPUS, resources={"slot": 1}, object_store_memory=OBJECT_STORE)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    try:
        port = free_port()
        start_serve(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(health_app(), name=HEALTH_APP, route_prefix="/healthz")
        context = ray.get_runtime_context()
        _cluster = RayCluster(url=f"http://127.0.0.1:{port}", head=context.get_node_id(), gcs=context.gcs_address)
    except BaseException:
        stop_ray()
        raise
    return _cluster


def is_running() -> bool:
    return _cluster is not None


def stop_shared() -> None:
    """Stop the session's cluster if it runs (after the last Ray test, or at the end of the session)."""
    global _cluster
    if _cluster is not None:
        _cluster = None
        stop_ray()


def stop_ray() -> None:
    import ray
    from ray import serve

    try:
        with contextlib.suppress(Exception):
            serve.shutdown()
    finally:
        ray.shutdown()


@contextlib.contextmanager
def deployed(app: Any, name: str, route_prefix: str) -> Iterator[None]:
    """``app`` running as ``name`` (``serve.run``: until its replicas are ready), deleted when the block ends."""
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix=route_prefix)
        yield
    finally:
        if _cluster is not None:  # else the cluster is gone, and the application with it
            serve.delete(name)


@dataclass
class RayApp:
    """A module's application: Serve's address and a store on the module's ledger."""

    url: str
    store: Store

    def client(self, timeout: float = 120) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def key(self, credits: int) -> tuple[str, int]:
        """A new key with ``credits``: (the key, its id)."""
        key = self.store.create_key(credits=credits, name="ray")[1]
        return key, self.store.authenticate(api_key=key).id


@contextlib.contextmanager
def app_ledger(tmp_path_factory: pytest.TempPathFactory, **more: Any) -> Iterator[tuple[Settings, Store]]:
    """A module's ledger (``ledger()``) and its application's settings on it: CPU, a heartbeat every
    ``HEARTBEAT_S``, a queue of 256, warnings only, and ``more``: (the settings, a store on the ledger)."""
    with ledger() as (url, store):
        yield Settings(database_url=url, data_dir=tmp_path_factory.mktemp("ray"), device="cpu",
                       heartbeat_s=HEARTBEAT_S, max_queue=256, log_level="warning", **more), store  # fmt: skip


@contextlib.contextmanager
def ledger() -> Iterator[tuple[str, Store]]:
    """A module's PostgreSQL database with sd3serve's schema: (its URL, a store on it)."""
    with pg_database("sd3serve_ray") as name:
        url = database_url(name)
        store = open_store(url)
        try:
            store.create_schema()
            yield url, store
        finally:
            store.close()


def start_ray(**kwargs: Any) -> None:
    """``ray.init(address="local", ...)`` for this checkout, tried up to 3 times: Ray gives its raylet a fixed
    30 s to register, which a loaded machine can miss (then nothing of the cluster is left to test)."""
    import ray

    for attempt in range(3):
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": RAY_ENV}, **kwargs)  # fmt: skip
            return
        except Exception as e:
            if attempt == 2 or "timed out during startup" not in str(e):
                raise
            ray.shutdown()


def start_serve(**kwargs: Any) -> None:
    """``serve.start(...)``, tried up to 3 times: Serve gives its proxy a fixed 60 s to become ready."""
    import ray
    from ray import serve

    for attempt in range(3):
        try:
            serve.start(**kwargs)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, TimeoutError):
            if attempt == 2:
                raise
            serve.shutdown()


def submit(c: httpx.Client, body: dict[str, object], headers: dict[str, str]) -> tuple[str, httpx.Headers]:
    """A v2 task of ``body``, accepted (asserted): (its id, the response's headers)."""
    r = c.post(SUBMIT, json=body, headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"]), r.headers


def reports(app_name: str, max_age_s: float) -> list[Any]:
    """The replica reports on ``app_name``'s board (``ReplicaReport``s younger than ``max_age_s``)."""
    from ray import serve

    board = serve.get_deployment_handle("ReplicaBoard", app_name=app_name)
    got: list[Any] = board.snapshot.remote(max_age_s).result()
    return got


def ready_of(app_name: str) -> list[Any]:
    """The reports of ``app_name``'s ready replicas (of the last 3 heartbeats)."""
    return [r for r in reports(app_name, 3 * HEARTBEAT_S) if r.ready]


def running_replicas(app_name: str, deployment: str = "SD3Replica", states: tuple[str, ...] = ("RUNNING",)) -> int:
    """How many replicas of ``deployment`` Serve counts in ``states`` (RUNNING; STARTING too: those the
    autoscaler decided on)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    counts = app.deployments[deployment].replica_states
    return sum(int(counts.get(state, 0)) for state in states)  # type: ignore[call-overload]


def task_row(store: Store, task: str) -> tuple[str, int, str]:
    """The task's owner (a ledger instance), its progress step and its status, from the database."""
    with store.engine.connect() as conn:
        row = conn.execute(select(Task.owner, Task.progress_step, Task.status).where(Task.id == task)).one()
    return row.owner, row.progress_step, row.status
