"""Ray Serve autoscaling and backpressure on a local Ray (2 CPUs, replicas of half a CPU, the demo model, one
PostgreSQL ledger): v1 load scales 1 → 2 replicas and idleness back to 1; a v2 flood scales too, and the tasks
submitted once two replicas run go to the idle one; requests past ``max_ongoing_requests`` and
``max_queued_requests`` get 503 with Retry-After (one queued at the edge is served). Slow-ish: about two minutes
here (a replica loads the model at each scale-up). Ray and Serve are the session's (tests/ray_support.py); the
applications are deleted when the module ends.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from live_server import SMALL, URL
from ray_support import WORK, RayApp, RayCluster, app_ledger, deployed, ready_of, running_replicas, submit, task_row
from waiting import wait_for

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from sd3serve.scaleout import APP_NAME, RETRY_AFTER_S, build_app, replica_options  # noqa: E402  (ray is optional)

pytestmark = pytest.mark.timeout(400)

TIGHT_APP = "sd3serve-tight"  # one replica, one request at a time, one queued
LONG = {**SMALL, "width": 1024, "height": 1024, "steps": 40}  # outlasts the next requests' routing, loaded or not
FLOOD = {**WORK, "width": 768, "height": 768, "steps": 50}  # 8 of them outlast a replica's start here
AUTOSCALING = {
    "min_replicas": 1, "initial_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
    "metrics_interval_s": 0.5, "look_back_period_s": 1, "upscale_delay_s": 0, "downscale_delay_s": 2,
}  # fmt: skip


@pytest.fixture(scope="module")
def scaling(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayApp]:
    """On the session's Ray (2 CPUs): the autoscaled application at ``/`` and the tight one at ``/tight``."""
    with app_ledger(tmp_path_factory, threads=1) as (settings, store):
        autoscaled = replica_options(settings, replicas=1, num_cpus=0.5, num_gpus=0)
        del autoscaled["num_replicas"]
        autoscaled["autoscaling_config"] = AUTOSCALING
        tight = {**replica_options(settings, replicas=1, num_cpus=0.5, num_gpus=0),
                 "max_ongoing_requests": 1, "max_queued_requests": 1}  # fmt: skip
        with (
            deployed(build_app(settings, options=autoscaled), APP_NAME, "/"),
            deployed(build_app(settings, options=tight), TIGHT_APP, "/tight"),
        ):
            yield RayApp(url=ray_cluster.url, store=store)


def test_load_scales_up_to_two_replicas_and_idleness_back_to_one(scaling: RayApp) -> None:
    wait_for(lambda: running_replicas(APP_NAME) == 1, timeout=120)  # idle (after another test's load too)
    key, key_id = scaling.key(6)
    with scaling.client(timeout=300) as c, ThreadPoolExecutor(6) as pool:
        load = [pool.submit(c.post, URL, json={**WORK, "seed": i}, headers={"x-api-key": key}) for i in range(6)]
        # 6 ongoing on one replica, target 1 each: the autoscaler starts a second one (its model loads for longer
        # than this load lasts: it may be stopped again before it runs)
        wait_for(lambda: running_replicas(APP_NAME, states=("STARTING", "RUNNING")) == 2, timeout=120)
        answers = [f.result() for f in load]
    assert [a.status_code for a in answers] == [200] * 6
    assert scaling.store.get_key(key_id=key_id).spent == 6
    wait_for(lambda: running_replicas(APP_NAME) == 1, timeout=120)  # idle: back to min_replicas
    with scaling.client(timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").status_code == 200


def test_a_v2_flood_scales_up_and_the_new_replica_runs_the_later_tasks(scaling: RayApp) -> None:
    wait_for(lambda: running_replicas(APP_NAME) == 1, timeout=120)
    key, key_id = scaling.key(10)
    h = {"x-api-key": key}
    with scaling.client(timeout=60) as c:
        # answered at once: only the runs are ongoing requests
        first = [submit(c, {**FLOOD, "seed": i}, h)[0] for i in range(8)]
        wait_for(lambda: running_replicas(APP_NAME) == 2 and len(ready_of(APP_NAME)) == 2, timeout=120)
        busy = {task_row(scaling.store, t)[0] for t in first}  # the instance that took the first ones over
        # the router sends them to the idle new replica
        later = [submit(c, {**WORK, "seed": 10 + i}, h)[0] for i in range(2)]
        tasks = first + later

        def done() -> bool:
            return all(task_row(scaling.store, t)[2] in ("COMPLETED", "FAILED") for t in tasks)

        wait_for(done, timeout=300)
        statuses = Counter(task_row(scaling.store, t)[2] for t in tasks)
        assert statuses == {"COMPLETED": 10}, statuses
        assert {task_row(scaling.store, t)[0] for t in later} - busy  # run elsewhere than the first ones
    assert scaling.store.get_key(key_id=key_id).spent == 10
    wait_for(lambda: running_replicas(APP_NAME) == 1, timeout=120)


def test_past_the_queue_limit_503_with_retry_after(scaling: RayApp) -> None:
    """The tight app: one request runs, one waits in Ray's queue (the edge: served), the next is refused."""
    key, key_id = scaling.key(3)
    h = {"x-api-key": key}
    wait_for(lambda: len(ready_of(TIGHT_APP)) == 1, timeout=120)
    with httpx.Client(base_url=scaling.url + "/tight", timeout=300) as c, ThreadPoolExecutor(3) as pool:
        running = pool.submit(c.post, URL, json={**LONG, "seed": 1}, headers=h)
        wait_for(lambda: scaling.store.get_key(key_id=key_id).credits == 2)  # its hold: the replica runs it
        go = threading.Barrier(2)

        def post(seed: int) -> httpx.Response:
            go.wait()
            return c.post(URL, json={**SMALL, "seed": seed}, headers=h)

        rivals = [pool.submit(post, seed) for seed in (2, 3)]  # one of them is queued, the other refused
        answers = sorted((f.result() for f in rivals), key=lambda r: r.status_code)
        assert running.result().status_code == 200
    queued, refused = answers
    assert queued.status_code == 200, queued.text
    assert refused.status_code == 503 and refused.headers["retry-after"] == str(RETRY_AFTER_S), refused.text
    info = scaling.store.get_key(key_id=key_id)
    assert info.spent == 2 and info.credits == 1  # the refused one held nothing
