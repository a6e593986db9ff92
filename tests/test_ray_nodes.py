"""Two Ray nodes on this machine: the head (the driver's, started here) and a second one started with
``ray start --address`` and resources of its own (``second``), each holding one ``slot`` so that Ray places
one replica on each. A replica away from the node holding a SQLite ledger refuses to start; a v2 task submitted
on one node is read from the other; taking the second node down while its replica runs a v2 task fails that task,
uncharged, and Serve, once the node is back, runs two replicas again. The head is the session's (tests/ray_support.py);
the second node is stopped when the module ends, by the process tree this module started (never ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from live_server import SMALL, URL
from ray_support import (
    CLUSTER_ENV,
    OBJECT_STORE,
    PROBE_EVERY_TIME,
    RAY_ENV,
    WORK,
    RayApp,
    RayCluster,
    app_ledger,
    deployed,
    is_running,
    ready_of,
    submit,
    task_row,
)
from sd3serve.settings import Settings
from waiting import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sd3serve.scaleout import APP_NAME, REPLICA_HEADER, build_app, replica_options  # noqa: E402  (ray is optional)

pytestmark = pytest.mark.timeout(400)

RAY_CLI = Path(sys.executable).with_name("ray")


@dataclass
class Nodes(RayApp):
    settings: Settings
    head: str  # node ids
    second: str
    start_second: Any  # () -> the process of `ray start --block`
    processes: list[psutil.Process]

    def ready(self) -> list[Any]:
        """The ready replicas' reports; none while the board is away (it restarts when its node went down)."""
        try:
            return ready_of(APP_NAME)
        except (ray.exceptions.RayError, RuntimeError):
            return []

    def node_of(self, replica: str) -> str | None:
        return next((r.node for r in self.ready() if r.replica == replica), None)


def alive_nodes() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def stop_tree(proc: psutil.Process) -> None:
    """Stop a process this module started and everything under it."""
    with contextlib.suppress(psutil.NoSuchProcess):
        tree = [*proc.children(recursive=True), proc]
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(tree, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


@pytest.fixture(scope="module")
def nodes(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """The session's Ray (its head holds one ``slot``), a second node joined to it, and two replicas that each
    need a ``slot``: one per node. The second node is stopped when the module ends."""
    processes: list[psutil.Process] = []

    def start_second() -> psutil.Process:
        before = set(alive_nodes())
        resources = json.dumps({"slot": 1, "second": 1})
        proc = subprocess.Popen(
            [str(RAY_CLI), "start", "--address", ray_cluster.gcs, "--num-cpus", "1", "--resources", resources,
             "--object-store-memory", str(OBJECT_STORE), "--disable-usage-stats", "--block"],
            env={**os.environ, **CLUSTER_ENV, **RAY_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        processes.append(psutil.Process(proc.pid))
        wait_for(lambda: set(alive_nodes()) - before, timeout=120)
        return processes[-1]

    with app_ledger(tmp_path_factory, threads=1) as (settings, store):
        try:
            start_second()
            second = next(n for n in alive_nodes() if n != ray_cluster.head)
            options = replica_options(settings, replicas=2, num_cpus=0.5, num_gpus=0)
            options["ray_actor_options"]["resources"] = {"slot": 1}  # one replica on each node
            options["ray_actor_options"]["runtime_env"] = PROBE_EVERY_TIME  # v2 runs to the less loaded, always
            with deployed(build_app(settings, options=options), APP_NAME, "/"):
                yield Nodes(url=ray_cluster.url, store=store, settings=settings, head=ray_cluster.head,
                            second=second, start_second=start_second, processes=processes)  # fmt: skip
        finally:
            for proc in processes:
                stop_tree(proc)
            if is_running():  # the next module's replicas must not be placed on a node that is going away
                wait_for(lambda: alive_nodes() == [ray_cluster.head], timeout=120)


def test_one_replica_on_each_node(nodes: Nodes) -> None:
    ready = wait_for(lambda: len(nodes.ready()) == 2 and nodes.ready(), timeout=180)
    # two nodes, one replica each: the head and the other one (a new node id once the kill test has restarted it)
    nodes_of_replicas = {r.node for r in ready}
    assert len(nodes_of_replicas) == 2 and nodes.head in nodes_of_replicas


def test_a_sqlite_ledger_is_refused_on_the_other_node(nodes: Nodes, tmp_path: Path) -> None:
    sqlite = nodes.settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'ledger.db'}"})
    options = replica_options(sqlite, replicas=1, num_cpus=0, num_gpus=0)
    options["ray_actor_options"]["resources"] = {"second": 0.001}  # only the second node has it
    try:
        serve._run(build_app(sqlite, options=options), name="sqlite", route_prefix="/sqlite", _blocking=False)

        def failed() -> str | None:  # the replica's constructor raised, three times in a row
            app = serve.status().applications.get("sqlite")
            if app is None or app.status != "DEPLOY_FAILED":
                return None
            return "\n".join([app.message, *(d.message for d in app.deployments.values())])

        message = wait_for(failed, timeout=300)
        assert "SQLite ledger" in message and "postgresql://" in message, message
    finally:
        serve.delete("sqlite")


def test_a_v2_task_submitted_on_one_node_is_read_from_the_other(nodes: Nodes) -> None:
    wait_for(lambda: len(nodes.ready()) == 2, timeout=180)
    key, key_id = nodes.key(1)
    h = {"x-api-key": key}
    with nodes.client() as c:
        task, submitted = submit(c, {**SMALL, "seed": 5}, h)
        on = nodes.node_of(submitted[REPLICA_HEADER])

        seen: set[tuple[str | None, str]] = set()  # (node, status) of the reads so far, for the failure message

        def read_on_the_other_node() -> httpx.Response | None:
            r = c.get(f"/v2/requests/{task}", headers=h)
            node = nodes.node_of(r.headers[REPLICA_HEADER])
            seen.add((node, r.json()["status"]))
            return r if r.json()["status"] == "COMPLETED" and node not in (on, None) else None

        try:
            result = wait_for(read_on_the_other_node, timeout=180)
        except AssertionError as e:
            raise AssertionError(f"submitted on {on}; reads: {seen}; {task_row(nodes.store, task)}") from e
        image = c.get(result.json()["output"][0], headers=h)
        assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
    assert nodes.store.get_key(key_id=key_id).spent == 1


def test_killing_the_node_running_a_task_fails_it_uncharged(nodes: Nodes) -> None:
    """The second node goes down, as a machine does, while its replica runs a v2 task: the task ends FAILED with
    nothing charged, the head's replica answers meanwhile, and Serve places a replica again once the node is back.

    The victim is chosen, not hoped for: tasks are submitted one at a time, each followed until it is placed (its
    runner took it over, or it runs); the first one that runs on the second node's replica is the victim. The
    replicas' routers probe queue lengths at every choice here (``PROBE_EVERY_TIME``, tests/ray_support.py) and
    send a run to the less loaded replica: once the head's replica runs one task, a later one goes to the
    second node. When the node goes down, every task submitted is placed, so none can be taken over meanwhile."""
    ready = wait_for(lambda: len(nodes.ready()) == 2 and nodes.ready(), timeout=180)
    remote = next(r for r in ready if r.node == nodes.second)
    instance_of = {r.replica: r.instance for r in ready}
    key, key_id = nodes.key(8)
    h = {"x-api-key": key}
    with nodes.client() as c:
        tasks: list[str] = []
        victim = ""
        while not victim:
            assert len(tasks) < 4, [task_row(nodes.store, t) for t in tasks]
            task, accepted = submit(c, {**WORK, "seed": len(tasks)}, h)
            tasks.append(task)
            submitter = instance_of[accepted[REPLICA_HEADER]]

            def placed(task: str = task, submitter: str = submitter) -> tuple[str, int, str] | None:
                row = task_row(nodes.store, task)  # (owner, step, status)
                return row if row[0] != submitter or row[2] != "QUEUED" else None

            owner, _, _ = wait_for(placed)
            if owner == remote.instance:  # the second node's replica runs it (or is about to start it)
                _, step, status = wait_for(lambda t=task: task_row(nodes.store, t)[2] != "QUEUED"
                                           and task_row(nodes.store, t))  # fmt: skip
                assert status == "PROCESSING" and step < WORK["steps"], (step, status)
                victim = task
        # The node goes down as a machine does: its raylet and every worker on it at once (a raylet killed alone
        # leaves its workers running for a while, and the task could still finish there).
        node_processes = nodes.processes[-1].children(recursive=True)
        assert any(p.name() == "raylet" for p in node_processes)
        for p in node_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for t in tasks:  # the head's: cancelled, so that the head's core is free for the rest (those already
            if t != victim:  # done stay COMPLETED)
                assert answered(lambda t=t: c.post(f"/v2/requests/{t}/cancel", headers=h)).status_code == 200

        status = wait_for(lambda: (s := answered(lambda: c.get(f"/v2/requests/{victim}/status", headers=h)).json())
                          and s["status"] not in ("QUEUED", "PROCESSING") and s, timeout=180)  # fmt: skip
        assert status["status"] == "FAILED" and "nothing was charged" in status["error"], status
        completed = sum(task_row(nodes.store, t)[2] == "COMPLETED" for t in tasks)
        info = wait_for(lambda: (k := nodes.store.get_key(key_id=key_id)).credits + k.spent == 8 and k)  # no hold
        assert info.spent == completed and info.credits == 8 - completed  # left: the victim's returned
        assert answered(lambda: c.post(URL, json=SMALL, headers=h)).status_code == 200  # the head's replica answers
        wait_for(lambda: nodes.second not in alive_nodes(), timeout=120)
        nodes.start_second()  # a node comes back: Serve places the missing replica there
        wait_for(lambda: len(nodes.ready()) == 2 and remote.replica not in {r.replica for r in nodes.ready()},
                 timeout=240)  # fmt: skip
        assert answered(lambda: c.post(URL, json=SMALL, headers=h)).status_code == 200
    assert nodes.store.get_key(key_id=key_id).spent == completed + 2


def answered(call: Callable[[], httpx.Response]) -> httpx.Response:
    """``call``'s first answer that is not a 5xx: until Serve has seen a replica die, its proxy may still route a
    request there (a 5xx, which held or charged nothing)."""
    return wait_for(lambda: (r := call()).status_code < 500 and r, timeout=120)
