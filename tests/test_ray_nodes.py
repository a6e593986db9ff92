"""Two Ray nodes on this machine: the head (the driver's, started here) and a second one started with
``ray start --address`` and resources of its own (``second``), each holding one ``slot`` so that Ray places
one replica on each. A replica away from the node holding a SQLite ledger refuses to start; a v2 task submitted
on one node is read from the other; killing the second node's raylet fails the work that ran there, uncharged,
and Serve, once the node is back, runs two replicas again. Slow-ish: about two minutes here. Both nodes are
stopped in ``finally`` (the second by the process tree this module started, never by ``ray stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from live_server import URL, free_port
from ray_support import RAY_ENV, pg_database, reports, start_ray, start_serve, task_row
from sd3serve.settings import Settings
from sd3serve.store.credits import CreditStore
from waiting import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sd3serve.scaleout import (  # noqa: E402  (ray is optional)
    APP_NAME,
    REPLICA_HEADER,
    build_app,
    replica_options,
)

pytestmark = pytest.mark.timeout(400)

SUBMIT = "/v2/stable-diffusion-3.5-turbo-txt2img"
HEARTBEAT_S = 2.0  # a replica silent for 3 heartbeats is dead: under load here, 1.5 s is not enough
SMALL = {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "steps": 2}
WORK = {**SMALL, "width": 512, "height": 512, "steps": 30}
RAY_CLI = Path(sys.executable).with_name("ray")
PREFER_LOCAL = "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING"


@dataclass
class Nodes:
    url: str
    store: CreditStore
    settings: Settings
    head: str  # node ids
    second: str
    start_second: Any  # () -> the process of `ray start --block`
    processes: list[psutil.Process]

    def key(self, credits: int) -> tuple[str, int]:
        key = self.store.create_key(credits=credits, name="nodes")[1]
        return key, self.store.authenticate(api_key=key).id

    def ready(self) -> list[Any]:
        return [r for r in reports(APP_NAME, 3 * HEARTBEAT_S) if r.ready]

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
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    processes: list[psutil.Process] = []
    with pg_database() as pg_url:
        settings = Settings(database_url=pg_url, data_dir=tmp_path_factory.mktemp("ray"), device="cpu", threads=1,
                            heartbeat_s=HEARTBEAT_S, max_queue=256, log_level="warning")  # fmt: skip
        # Serve's proxy sends requests to replicas on its own node while they have room: the reads that must
        # reach the second node's replica would never leave the head. Spread them (the proxy reads this at start).
        local_first = os.environ.get(PREFER_LOCAL)
        os.environ[PREFER_LOCAL] = "0"
        start_ray(num_cpus=1, resources={"slot": 1}, object_store_memory=100 * 2**20)
        head = ray.get_runtime_context().get_node_id()
        gcs = ray.get_runtime_context().gcs_address
        store = CreditStore(pg_url)
        store.create_schema()

        def start_second() -> psutil.Process:
            before = set(alive_nodes())
            env = {**os.environ, **RAY_ENV, PREFER_LOCAL: "0"}
            resources = json.dumps({"slot": 1, "second": 1})
            proc = subprocess.Popen(
                [str(RAY_CLI), "start", "--address", gcs, "--num-cpus", "1", "--resources", resources,
                 "--object-store-memory", str(100 * 2**20), "--disable-usage-stats", "--block"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            processes.append(psutil.Process(proc.pid))
            wait_for(lambda: set(alive_nodes()) - before, timeout=120)
            return processes[-1]

        try:
            start_second()
            second = next(n for n in alive_nodes() if n != head)
            port = free_port()
            start_serve(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
            options = replica_options(settings, replicas=2, num_cpus=0.5, num_gpus=0)
            options["ray_actor_options"]["resources"] = {"slot": 1}  # one replica on each node
            serve.run(build_app(settings, options=options), name=APP_NAME, route_prefix="/")
            yield Nodes(url=f"http://127.0.0.1:{port}", store=store, settings=settings, head=head, second=second,
                        start_second=start_second, processes=processes)  # fmt: skip
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                if local_first is None:
                    os.environ.pop(PREFER_LOCAL, None)
                else:
                    os.environ[PREFER_LOCAL] = local_first
                for proc in processes:
                    stop_tree(proc)
                store.close()


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
    with httpx.Client(base_url=nodes.url, timeout=120) as c:
        submitted = c.post(SUBMIT, json={**SMALL, "seed": 5}, headers=h)
        assert submitted.status_code == 200, submitted.text
        task = submitted.json()["request_id"]
        on = nodes.node_of(submitted.headers[REPLICA_HEADER])

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


@pytest.mark.xfail(
    reason="not yet stable: in the last runs a victim task ended COMPLETED (the node's workers outlived its raylet) "
    "and, after killing the whole node, the test still failed once; see the issue 28 note",
    strict=False,
)
def test_killing_the_second_nodes_raylet_fails_its_work_uncharged(nodes: Nodes) -> None:
    ready = wait_for(lambda: len(nodes.ready()) == 2 and nodes.ready(), timeout=180)
    remote = next(r for r in ready if r.node == nodes.second)
    key, key_id = nodes.key(8)
    h = {"x-api-key": key}
    with httpx.Client(base_url=nodes.url, timeout=120) as c:
        tasks: list[str] = []

        def owner(task: str) -> str:
            row_owner, _, status = task_row(nodes.store, task)
            return row_owner if status in ("QUEUED", "PROCESSING") else ""

        # Ray's router sends each run to the replica with fewer ongoing ones: after one or two, the second node.
        while remote.instance not in {owner(t) for t in tasks}:
            assert len(tasks) < 6
            r = c.post(SUBMIT, json={**WORK, "seed": len(tasks)}, headers=h)
            assert r.status_code == 200, r.text
            tasks.append(r.json()["request_id"])
            wait_for(lambda: sum(rep.queued + rep.running for rep in nodes.ready()) >= len(tasks)
                     or remote.instance in {owner(t) for t in tasks})  # fmt: skip
        victims = [t for t in tasks if owner(t) == remote.instance]
        # The node goes down as a machine does: its raylet and every worker on it at once (a raylet killed alone
        # leaves its workers running for a while, and the task could still finish there).
        node_processes = nodes.processes[-1].children(recursive=True)
        assert any(p.name() == "raylet" for p in node_processes)
        for p in node_processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

        def settled() -> bool:
            return all(task_row(nodes.store, t)[2] in ("COMPLETED", "FAILED") for t in tasks)

        wait_for(settled, timeout=300)
        for t in tasks:
            status = c.get(f"/v2/requests/{t}/status", headers=h).json()
            if t in victims:
                assert status["status"] == "FAILED" and "nothing was charged" in status["error"], status
        completed = sum(task_row(nodes.store, t)[2] == "COMPLETED" for t in tasks)
        info = nodes.store.get_key(key_id=key_id)
        assert info.spent == completed and info.credits == 8 - completed
        assert c.post(URL, json=SMALL, headers=h).status_code == 200  # the head's replica answers meanwhile
        wait_for(lambda: nodes.second not in alive_nodes(), timeout=120)
        nodes.start_second()  # a node comes back: Serve places the missing replica there
        wait_for(lambda: len(nodes.ready()) == 2 and remote.replica not in {r.replica for r in nodes.ready()},
                 timeout=240)  # fmt: skip
        assert c.post(URL, json=SMALL, headers=h).status_code == 200
    assert nodes.store.get_key(key_id=key_id).spent == completed + 2
