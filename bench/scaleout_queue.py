"""v2 dispatch on Ray Serve, the two designs of issue 28 side by side in one run, 1 and 2 replicas each.

- ``handle``: what sd3serve does (scaleout_tasks.py): the submitting replica calls ``run_task`` through the
  deployment handle, Ray's router picks the replica (power of two choices on ongoing requests).
- ``queue``: a prototype, here only: the submitting replica inserts the task (its hold, owner and order,
  pickled) into a PostgreSQL table and returns; every replica polls the table every ``POLL_S`` and claims the
  oldest row with ``DELETE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1)`` while fewer than
  ``CLAIM_AHEAD`` of its claims are unfinished (one running, one waiting, so that its engine never idles between
  tasks), then takes the task over and runs it exactly as the handle design's runner does (``run_dispatched``).
  What a product would still need (not built: see docs/scale-out.md): reporting the claimed rows and the
  backlog to the autoscaler, LISTEN/NOTIFY instead of the poll.

One local Ray cluster, four applications (``handle-1``, ``handle-2``, ``queue-1``, ``queue-2``) under their own
route prefixes, each on its own PostgreSQL database (127.0.0.1:5432, created and dropped here); a 1-replica
application has 2 torch threads, a 2-replica one 1 thread per replica (as bench/scaleout.py). Each round submits
``--n`` v2 tasks to one application at once and waits until all are COMPLETED (images/s from the first submission
to the last completion); applications take turns, round by round. Prints images/s, where the tasks ran, and the
ratios: 2 / 1 replicas for each design, queue / handle for each replica count.

    PYTHONPATH=src:bench python bench/scaleout_queue.py [--n 16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import pickle
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import ray
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from ray import serve
from sqlalchemy import Engine, text
from starlette.types import ASGIApp

from common import v2_round
from sd3serve.ledger import Database, Reservation
from sd3serve.scaleout import QUIET, ReplicaBoard, SD3Replica, build_app, overrides, replica_options
from sd3serve.scaleout_tasks import run_dispatched
from sd3serve.service.order import Order
from sd3serve.settings import Settings

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
POLL_S = 0.05
CLAIM_AHEAD = 2
QUEUE_DDL = "CREATE TABLE IF NOT EXISTS bench_v2_queue (id bigserial PRIMARY KEY, payload bytea NOT NULL)"
CLAIM = (
    "DELETE FROM bench_v2_queue WHERE id = (SELECT id FROM bench_v2_queue ORDER BY id FOR UPDATE SKIP LOCKED "
    "LIMIT 1) RETURNING payload"
)
SYSTEMS = {"handle-1": ("handle", 1), "handle-2": ("handle", 2), "queue-1": ("queue", 1), "queue-2": ("queue", 2)}
PROMPTS = [f"a {c} {s}" for c, s in itertools.product(("red", "blue", "green", "white"), ("circle", "square", "star"))]


# --- the queue design (runs in the replicas) ------------------------------------------------------------------


class QueueDispatch:
    """``GenerationService.dispatch``: put the accepted task in the table; whichever replica claims it runs it."""

    def __init__(self, engine: Engine, owner: Callable[[], str]) -> None:
        self.engine = engine
        self.owner = owner

    async def __call__(self, reservation: Reservation, order: Order, task_id: str) -> None:
        payload = pickle.dumps((reservation.hold, self.owner(), order, task_id))
        await run_in_threadpool(self._insert, payload)

    def _insert(self, payload: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("INSERT INTO bench_v2_queue (payload) VALUES (:p)"), {"p": payload})


def claim(engine: Engine) -> bytes | None:
    with engine.begin() as conn:
        row = conn.execute(text(CLAIM)).first()
    return bytes(row[0]) if row is not None else None


async def pull_forever(state: Any) -> None:
    """Claim tasks while fewer than ``CLAIM_AHEAD`` of this replica's claims are unfinished; run each one."""
    running: set[asyncio.Task[None]] = set()
    while True:
        payload = await run_in_threadpool(claim, state.ledger.db.engine) if len(running) < CLAIM_AHEAD else None
        if payload is None:
            await asyncio.sleep(POLL_S)
            continue
        hold, submitter, order, task_id = pickle.loads(payload)
        run = asyncio.create_task(run_dispatched(state.service, owner=submitter, hold=hold, order=order,
                                                 task_id=task_id))  # fmt: skip
        running.add(run)
        run.add_done_callback(running.discard)


class QueueReplica(SD3Replica):
    """sd3serve's replica with the queue design in place of the handle: dispatch inserts, a poller claims."""

    def __serve_build_asgi_app__(self) -> ASGIApp:
        outer = super().__serve_build_asgi_app__()
        assert self.api is not None
        started = self.api.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
            async with started(a) as st:
                state = self._state()
                with state.ledger.db.engine.begin() as conn:
                    conn.execute(text(QUEUE_DDL))
                state.service.dispatch = QueueDispatch(state.ledger.db.engine, lambda: state.ledger.instance_id)
                puller = asyncio.create_task(pull_forever(state), name="queue-puller")
                try:
                    yield st
                finally:
                    puller.cancel()

        self.api.router.lifespan_context = lifespan
        return outer


def queue_app(settings: Settings, options: dict[str, Any]) -> serve.Application:
    """build_app with ``QueueReplica``."""
    board = serve.deployment(ReplicaBoard, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000,
                             logging_config=QUIET)  # fmt: skip
    replica = serve.deployment(serve.ingress()(QueueReplica), name="SD3Replica").options(**options)
    return replica.bind(overrides(settings), board.bind(), None)


# --- the driver -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def databases(names: list[str]) -> Iterator[dict[str, str]]:
    dbs = {name: f"bench_queue_{uuid.uuid4().hex[:8]}" for name in names}
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        for db in dbs.values():
            admin.execute(f'CREATE DATABASE "{db}"')
    try:
        yield {name: f"postgresql://postgres@127.0.0.1:5432/{db}" for name, db in dbs.items()}
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            for db in dbs.values():
                admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=16, help="v2 tasks submitted at once per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    a = parser.parse_args()
    here = Path(__file__).resolve().parent
    env = {"PYTHONPATH": os.pathsep.join([str(here.parent / "src"), str(here)]), "HF_HUB_OFFLINE": "1",
           "OMP_WAIT_POLICY": "PASSIVE"}  # fmt: skip
    prompts = itertools.cycle(PROMPTS)
    with databases(list(SYSTEMS)) as urls, contextlib.ExitStack() as stack:
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": env})  # fmt: skip
        stack.callback(ray.shutdown)
        port = 8000 + os.getpid() % 1000
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        stack.callback(serve.shutdown)
        keys, stores = {}, {}
        for name, (design, replicas) in SYSTEMS.items():
            settings = Settings(database_url=urls[name], device="cpu", threads=2 // replicas, log_level="warning",
                                max_queue=256)  # fmt: skip
            stores[name] = db = Database.open(urls[name])
            db.create_schema()
            with db.transaction() as tx:
                keys[name] = tx.keys.create(credits=10**9, name="bench")[1]
            options = replica_options(settings, replicas=replicas, num_cpus=2 // replicas, num_gpus=0)
            app = build_app(settings, options=options) if design == "handle" else queue_app(settings, options)
            serve.run(app, name=name, route_prefix=f"/{name}")
            print(f"{name} ready", file=sys.stderr)
        base = f"http://127.0.0.1:{port}"
        client = stack.enter_context(httpx.Client(timeout=300))

        def round_of(name: str, n: int) -> tuple[float, list[str]]:
            """Seconds from the first of ``n`` submissions to the last completion, and the tasks."""
            bodies = ({"prompt": next(prompts), "width": a.size, "height": a.size, "steps": a.steps, "seed": 1}
                      for _ in range(n))  # fmt: skip
            return v2_round(client, f"{base}/{name}", keys[name], bodies)

        for name in SYSTEMS:  # warm-up: each replica's first images
            round_of(name, 4)
        busy = dict.fromkeys(SYSTEMS, 0.0)
        runners: dict[str, Counter[str]] = {name: Counter() for name in SYSTEMS}
        for _ in range(a.rounds):
            for name in SYSTEMS:
                seconds, tasks = round_of(name, a.n)
                busy[name] += seconds
                with stores[name].engine.connect() as conn:
                    owners = conn.execute(text("SELECT owner FROM tasks WHERE id = ANY(:ids)"), {"ids": tasks})
                    runners[name].update(row[0] for row in owners)
        for store in stores.values():
            store.close()

    ips = {name: a.n * a.rounds / busy[name] for name in SYSTEMS}
    print(f"\nv2 on Ray Serve, {a.size}², {a.steps} steps, demo model, {os.cpu_count()} cores: {a.n} tasks submitted "
          f"at once, wait for all; {a.rounds} round(s) per application, interleaved\n")  # fmt: skip
    print("| design | images/s, 1 replica | images/s, 2 replicas | 2 / 1 | tasks per replica (2 replicas) |")
    print("| --- | --- | --- | --- | --- |")
    for design in ("handle", "queue"):
        one, two = ips[f"{design}-1"], ips[f"{design}-2"]
        split = " / ".join(str(n) for n in sorted(runners[f"{design}-2"].values(), reverse=True))
        print(f"| {design} | {one:.2f} | {two:.2f} | {two / one:.2f} | {split} |")
    print(f"\nqueue / handle images/s: 1 replica {ips['queue-1'] / ips['handle-1']:.2f}, "
          f"2 replicas {ips['queue-2'] / ips['handle-2']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
