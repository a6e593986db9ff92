"""Scale out on Ray Serve: a local Ray cluster started here, two CPU replicas of the demo model on PostgreSQL.

The seed request over HTTP and through the segmind SDK (v1 and v2), credits exact under 200 concurrent requests
from keys that run dry, a v2 task submitted to one replica and read from the other, a replica killed mid-request
(nothing lost, nothing charged twice, Serve brings it back), metrics labelled per replica, readiness counting
replicas; the Serve config and the KubeRay manifest parse against Ray Serve's schema. Ray and Serve are the
session's (``ray_cluster``, tests/ray_support.py); this module's application is deleted when it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

import sd3serve
from live_server import SMALL, URL
from ray_support import RayApp, RayCluster, app_ledger, deployed, ready_of, submit, task_row
from sd3serve.settings import Settings
from waiting import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sd3serve.scaleout import (  # noqa: E402  (ray is optional)
    APP_NAME,
    REPLICA_HEADER,
    ReplicaReport,
    SQLiteAcrossHosts,
    build_app,
    check_database,
    replica_options,
)

pytestmark = pytest.mark.timeout(300)

DEPLOY = Path(__file__).parents[1] / "deploy"
# Long enough (~15 s quiet, one thread) for the replica reports, every heartbeat, to show it running
LONG = {**SMALL, "width": 1024, "height": 1024, "steps": 70}
MAX_V1 = 6  # v1 requests sent at most to have both replicas busy


@dataclass
class Cluster(RayApp):
    healthz_before_ready: list[int]  # /healthz statuses seen while the model replicas were starting

    def ready_replicas(self) -> list[ReplicaReport]:
        return ready_of(APP_NAME)


@pytest.fixture(scope="module")
def cluster(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's Ray (2 CPUs), 2 replicas with 1 CPU (1 torch thread) each, on a database of this module."""
    with app_ledger(tmp_path_factory) as (settings, store):
        options = replica_options(settings, replicas=2, num_cpus=1, num_gpus=0)
        url = ray_cluster.url
        seen: list[int] = []
        starting = threading.Event()
        starting.set()

        def probe() -> None:  # /healthz while the replicas load the model
            while starting.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    seen.append(httpx.get(f"{url}/healthz", timeout=5).status_code)
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        with contextlib.ExitStack() as app:
            try:
                app.enter_context(deployed(build_app(settings, options=options), APP_NAME, "/"))
            finally:
                starting.clear()
                prober.join()
            yield Cluster(url=url, store=store, healthz_before_ready=seen)


def test_healthz_answers_while_the_replicas_start(cluster: Cluster) -> None:
    assert 200 in cluster.healthz_before_ready, cluster.healthz_before_ready  # before any model replica was up
    with cluster.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}


def test_replicas_run_this_checkout_with_one_thread_each(cluster: Cluster) -> None:
    reports = wait_for(lambda: len(cluster.ready_replicas()) == 2 and cluster.ready_replicas())
    assert {Path(r.package).resolve() for r in reports} == {Path(sd3serve.__file__).resolve()}
    assert len({r.pid for r in reports}) == 2
    for r in reports:  # num_cpus 1: one torch thread, the wait policy set before torch loaded
        assert r.threads["torch_threads"] == 1 and r.threads["OMP_WAIT_POLICY"] == "PASSIVE", r.threads
        assert not r.threads["torch_imported_before"]
    with cluster.client() as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"status": "ready", "replicas": {"ready": 2, "starting": 0}}
        assert c.get("/healthz").json() == {"status": "ok"}


def test_the_seed_request_over_http(cluster: Cluster) -> None:
    key, _ = cluster.key(5)
    with cluster.client() as c:
        r = c.post(URL, json={**SMALL, "seed": 42}, headers={"x-api-key": key})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/jpeg" and r.content[:3] == b"\xff\xd8\xff"
        assert r.headers["x-remaining-credits"] == "4" and r.headers["x-seed-value"] == "42"
        assert r.headers[REPLICA_HEADER]
        again = c.post(URL, json={**SMALL, "seed": 42}, headers={"x-api-key": key})
        assert again.content == r.content  # whichever replica answers: the same bytes
        assert c.get("/v1/get-user-credits", headers={"x-api-key": key}).json() == {"credits": 3}
        assert c.post(URL, json=SMALL, headers={"x-api-key": "sk-nope"}).status_code == 401


def test_the_segmind_sdk_v1_and_v2(cluster: Cluster) -> None:
    segmind = pytest.importorskip("segmind")
    key, key_id = cluster.key(3)
    client = segmind.SegmindClient(api_key=key, base_url=cluster.url + "/v1", timeout=120)
    slug = "stable-diffusion-3.5-turbo-txt2img"
    image = client.run_sync(slug, **{**SMALL, "seed": 7})
    assert image.headers["content-type"] == "image/jpeg" and image.content[:3] == b"\xff\xd8\xff"
    job = client.submit_async(slug, **{**SMALL, "seed": 7, "base64": True})
    result = job.wait(timeout=120, interval=0.2)
    assert result["status"] == "COMPLETED" and len(result["output"]) == 1 and result["seed"] == 7
    assert cluster.store.get_key(key_id=key_id).spent == 2


def test_a_v2_task_submitted_to_one_replica_is_read_from_the_other(cluster: Cluster) -> None:
    key, key_id = cluster.key(1)
    h = {"x-api-key": key}
    with cluster.client() as c:
        task, submitted = submit(c, {**SMALL, "seed": 3}, h)
        runner = submitted[REPLICA_HEADER]

        def read_elsewhere() -> httpx.Response | None:
            r = c.get(f"/v2/requests/{task}", headers=h)
            done = r.json()["status"] == "COMPLETED"
            return r if done and r.headers[REPLICA_HEADER] != runner else None

        result = wait_for(read_elsewhere)  # Ray routes each read to one of the two: soon to the other
        image = c.get(result.json()["output"][0], headers=h)
        assert image.status_code == 200 and image.content[:3] == b"\xff\xd8\xff"
    assert cluster.store.get_key(key_id=key_id).spent == 1


def test_credits_are_exact_under_200_concurrent_requests(cluster: Cluster) -> None:
    balances = [40, 25, 15, 8, 3]  # every key runs dry
    keys = [cluster.key(b)[0] for b in balances]
    body = {**SMALL, "steps": 1}
    with httpx.Client(base_url=cluster.url, timeout=240, limits=httpx.Limits(max_connections=200)) as c:

        def one(key: str) -> tuple[str, int, str]:
            r = c.post(URL, json=body, headers={"x-api-key": key})
            return key, r.status_code, r.headers.get(REPLICA_HEADER, "")

        with ThreadPoolExecutor(200) as pool:
            results = list(pool.map(one, [keys[i % len(keys)] for i in range(200)]))
    statuses = Counter(code for _, code, _ in results)
    assert set(statuses) <= {200, 406}, statuses
    assert len({replica for _, code, replica in results if code == 200}) == 2  # both replicas served
    for key, balance in zip(keys, balances, strict=True):
        info = cluster.store.get_key(key_id=cluster.store.authenticate(api_key=key).id)
        delivered = sum(1 for k, code, _ in results if k == key and code == 200)
        assert info.spent == delivered and info.credits + info.spent == balance and info.credits == 0


def test_metrics_are_labelled_per_replica_in_one_scrape(cluster: Cluster) -> None:
    key, _ = cluster.key(1)

    def delivered(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("sd3serve_images_total{")]

    with cluster.client() as c:
        assert c.post(URL, json=SMALL, headers={"x-api-key": key}).status_code == 200
        # The replica that answers the scrape reports its own figures fresh, the other's as of its last report
        # (every heartbeat): the image shows once the replica that made it has reported.
        def scrape_with_the_image() -> str | None:
            text = c.get("/metrics").text
            return text if sum(float(line.split()[-1]) for line in delivered(text)) >= 1 else None

        text = wait_for(scrape_with_the_image, 60)
    replicas = {r.replica for r in cluster.ready_replicas()}
    for replica in replicas:
        assert f'sd3serve_queue_depth{{replica="{replica}"}}' in text
    assert text.count("# TYPE sd3serve_images_total counter") == 1
    assert len(delivered(text)) == 2


def test_a_replica_killed_mid_request(cluster: Cluster) -> None:
    """SIGKILL of the replica running a v2 task and a v1 request: the task ends FAILED and the request fails
    5xx, both uncharged (the other replica settles the dead one's holds); Serve starts a new replica; the API
    answers. v1 requests are sent until both replicas run one (Ray's router sends each to the less loaded replica,
    as far as its probes of queue lengths know: on a loaded machine they may all go to one, up to ``MAX_V1``); the
    victim is the replica that owns the task then (the task row names its ledger instance, the replica's report
    maps that to a pid)."""
    key, key_id = cluster.key(10)
    h = {"x-api-key": key}
    before = {r.replica for r in wait_for(lambda: len(cluster.ready_replicas()) == 2 and cluster.ready_replicas())}

    def load() -> dict[str, int]:
        return {r.replica: r.queued + r.running for r in cluster.ready_replicas()}

    wait_for(lambda: sum(load().values()) == 0)  # nothing left from earlier tests' requests
    with cluster.client() as c, ThreadPoolExecutor(MAX_V1) as pool:
        v1 = []
        while not (len(v1) >= 2 and len(load()) == 2 and all(load().values())) and len(v1) < MAX_V1:
            v1.append(pool.submit(lambda: httpx.post(cluster.url + URL, json=LONG, headers=h, timeout=300)))
            wait_for(lambda: sum(load().values()) >= len(v1))
        task, _ = submit(c, LONG, h)

        wait_for(lambda: sum(load().values()) > len(v1))  # in an engine's queue: taken over by its runner
        owner, _, _ = task_row(cluster.store, task)
        victim = next(r for r in cluster.ready_replicas() if r.instance == owner)
        victim_v1 = load()[victim.replica] - 1  # what it runs or queues besides the task
        os.kill(victim.pid, signal.SIGKILL)
        answers = [f.result(timeout=300) for f in v1]
        for answer in answers:  # the victim's fail; the other's finish (or Ray retried one elsewhere)
            assert answer.status_code >= 500 or answer.status_code == 200, answer.text
        delivered = sum(answer.status_code == 200 for answer in answers)
        if victim_v1 > 0:
            assert delivered < len(answers)  # the victim's v1 request failed with it

        def failed() -> dict[str, object] | None:
            status: dict[str, object] = c.get(f"/v2/requests/{task}/status", headers=h).json()
            return status if status["status"] != "PROCESSING" and status["status"] != "QUEUED" else None

        status = wait_for(failed, timeout=180)
        assert status["status"] == "FAILED" and "nothing was charged" in str(status["error"]), status
        # The victim's v1 hold is returned by the other replica's recovery (3 heartbeats after its last one); the
        # task's, maybe sooner, by its submitter whose call failed. Then: no hold left, nothing charged twice.
        info = wait_for(lambda: (k := cluster.store.get_key(key_id=key_id)).credits + k.spent == 10 and k)
        assert info.spent == delivered and info.credits == 10 - delivered

        def replaced() -> list[ReplicaReport]:  # the victim's last report lingers on the board for 3 heartbeats
            ready = cluster.ready_replicas()
            return ready if len(ready) == 2 and victim.replica not in {r.replica for r in ready} else []

        after = wait_for(replaced, timeout=180)
        assert len(before & {r.replica for r in after}) == 1
        assert c.post(URL, json=SMALL, headers=h).status_code == 200
        assert cluster.store.get_key(key_id=key_id).spent == delivered + 1


def test_sqlite_on_another_host_is_refused() -> None:
    check_database("sqlite:////data/sd3serve.db", origin_node="a", this_node="a")
    check_database("postgresql://db/sd3serve", origin_node="a", this_node="b")
    with pytest.raises(SQLiteAcrossHosts, match="postgresql://"):
        check_database("sqlite:////data/sd3serve.db", origin_node="a", this_node="b")


def test_the_serve_config_and_the_kuberay_manifest_parse_against_serves_schema() -> None:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((DEPLOY / "serve-config.yaml").read_text()))
    manifests = list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))
    service = next(m for m in manifests if m["kind"] == "RayService")
    in_kuberay = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    for parsed in (config, in_kuberay):
        health, app = parsed.applications
        assert (health.import_path, health.route_prefix) == ("sd3serve.scaleout:health_builder", "/healthz")
        assert app.import_path == "sd3serve.scaleout:app_builder" and app.route_prefix == "/"
        deployments = {d.name: d for d in app.deployments}
        assert deployments["SD3Replica"].ray_actor_options.num_gpus == 1
        assert deployments["SD3Replica"].autoscaling_config["min_replicas"] >= 0
        Settings(**app.args)  # the args are settings
