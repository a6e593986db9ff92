"""What the Ray test modules share: a PostgreSQL database of their own, a local Ray started for this checkout,
the replica board of an application, and the replica counts Serve reports."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import select

import sd3serve
from sd3serve.store.credits import CreditStore
from sd3serve.store.models import Task

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SRC = Path(sd3serve.__file__).parents[1]
# Workers of a local cluster get the driver's environment: the replicas import this checkout's sd3serve.
RAY_ENV = {"PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), "HF_HUB_OFFLINE": "1"}


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A PostgreSQL database for one test module, dropped afterwards."""
    name = f"sd3serve_ray_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def reports(app_name: str, max_age_s: float) -> list[Any]:
    """The replica reports on ``app_name``'s board (``ReplicaReport``s younger than ``max_age_s``)."""
    from ray import serve

    board = serve.get_deployment_handle("ReplicaBoard", app_name=app_name)
    got: list[Any] = board.snapshot.remote(max_age_s).result()
    return got


def running_replicas(app_name: str, deployment: str = "SD3Replica", states: tuple[str, ...] = ("RUNNING",)) -> int:
    """How many replicas of ``deployment`` Serve counts in ``states`` (RUNNING; STARTING too: those the
    autoscaler decided on)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return 0
    counts = app.deployments[deployment].replica_states
    return sum(int(counts.get(state, 0)) for state in states)  # type: ignore[call-overload]


def task_row(store: CreditStore, task: str) -> tuple[str, int, str]:
    """The task's owner (a ledger instance), its progress step and its status, from the database."""
    with store.engine.connect() as conn:
        row = conn.execute(select(Task.owner, Task.progress_step, Task.status).where(Task.id == task)).one()
    return row.owner, row.progress_step, row.status
