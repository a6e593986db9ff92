"""The parts of the Ray Serve scale-out (sd3serve/scaleout.py) that need no cluster, as docs/scaling.md and
docs/scale-out.md describe them: a SQLite ledger refused away from its node, the replica board's reports and their
age, `/metrics` of every replica with a `replica` label, `/readyz` counting ready and starting replicas, every
response naming its replica, the settings and Serve options the replicas get. A cluster runs them in
tests/test_ray*.py; here they run in this process, where the mutation tool sees them."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray")

from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from sd3serve import scaleout
from sd3serve.scaleout import (
    MAX_ONGOING_REQUESTS,
    REPLICA_HEADER,
    RETRY_AFTER_S,
    Liveness,
    ReplicaBoard,
    ReplicaHeader,
    ReplicaReport,
    SD3Replica,
    SQLiteAcrossHosts,
    check_database,
    labelled,
    merged,
    overrides,
    replace_route,
    replica_options,
)
from sd3serve.settings import Settings


def test_a_sqlite_ledger_is_refused_away_from_its_node() -> None:
    with pytest.raises(SQLiteAcrossHosts, match="SD3SERVE_DATABASE_URL"):
        check_database("sqlite:////data/ledger.db", origin_node="head", this_node="worker")
    check_database("sqlite:////data/ledger.db", origin_node="head", this_node="head")
    check_database("sqlite:////data/ledger.db", origin_node=None, this_node="worker")  # built outside Ray
    check_database("postgresql://db/sd3", origin_node="head", this_node="worker")


def report(replica: str, *, ready: bool = True, metrics: list[Any] | None = None) -> ReplicaReport:
    return ReplicaReport(replica=replica, node="n", pid=1, ready=ready, metrics=metrics or [])


def test_the_board_keeps_each_replicas_last_report_sorted_by_name() -> None:
    board = ReplicaBoard()
    board.push(report("b", ready=False))
    board.push(report("a"))
    board.push(report("b", ready=True))
    shown = board.snapshot(max_age_s=60)
    assert [(r.replica, r.ready) for r in shown] == [("a", True), ("b", True)]
    assert all(time.monotonic() - r.at < 60 for r in shown)
    board.drop("a")
    board.drop("never-there")
    assert [r.replica for r in board.snapshot(max_age_s=60)] == ["b"]


def test_the_board_forgets_reports_older_than_the_age_it_is_asked_for() -> None:
    board = ReplicaBoard()
    board.push(report("old"))
    board.push(report("new"))
    board._reports["old"].at -= 10  # reported ten seconds ago
    assert [r.replica for r in board.snapshot(max_age_s=11)] == ["new", "old"]
    assert [r.replica for r in board.snapshot(max_age_s=9)] == ["new"]
    assert [r.replica for r in board.snapshot(max_age_s=60)] == ["new"]  # gone for good


def families(count: float) -> list[Any]:
    registry = CollectorRegistry()
    requests = Counter("sd3serve_requests", "HTTP requests", ["status"], registry=registry)
    requests.labels("200").inc(count)
    return list(registry.collect())


def test_metrics_of_every_replica_carry_a_replica_label_side_by_side() -> None:
    one, two = labelled(families(2), "r1"), labelled(families(5), "r2")
    assert one[0].name == "sd3serve_requests" and one[0].type == "counter"
    assert one[0].documentation == "HTTP requests"
    assert all(s.labels["replica"] == "r1" for s in one[0].samples)
    text = merged([report("r1", metrics=one), report("r2", metrics=two)]).decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    totals = {(s.labels["replica"], s.labels["status"]): s.value
              for s in parsed["sd3serve_requests"].samples if s.name == "sd3serve_requests_total"}  # fmt: skip
    assert totals == {("r1", "200"): 2.0, ("r2", "200"): 5.0}
    assert text.count("# TYPE sd3serve_requests_total counter") == 1  # one family per name
    assert merged([]) == b""


def test_labelled_families_keep_their_unit() -> None:
    registry = CollectorRegistry()
    Counter("sd3serve_work", "work done", unit="seconds", registry=registry).inc()
    (family,) = labelled(list(registry.collect()), "r1")
    assert family.unit == "seconds" and family.name == "sd3serve_work_seconds"


def test_every_response_names_its_replica() -> None:
    app = FastAPI()

    @app.get("/x")
    def x() -> dict[str, str]:
        return {"ok": "yes"}

    client = TestClient(ReplicaHeader(app, "replica-7"))  # type: ignore[arg-type]
    for path in ("/x", "/missing"):
        assert client.get(path).headers[REPLICA_HEADER] == "replica-7"

    seen: list[str] = []

    async def lifespan_app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    asyncio.run(ReplicaHeader(lifespan_app, "r")({"type": "lifespan"}, None, None))  # type: ignore[arg-type]
    assert seen == ["lifespan"]


def test_a_replaced_route_answers_first_and_the_apps_own_stays_documented() -> None:
    app = FastAPI()

    @app.get("/readyz", summary="the app's own")
    def own() -> dict[str, str]:
        return {"from": "app"}

    async def cluster() -> dict[str, str]:
        return {"from": "cluster"}

    replace_route(app, "/readyz", cluster, "the cluster's")
    client = TestClient(app)
    assert client.get("/readyz").json() == {"from": "cluster"}
    assert client.get("/openapi.json").json()["paths"]["/readyz"]["get"]["summary"] == "the app's own"


def test_the_liveness_app_answers_ok() -> None:
    response = asyncio.run(Liveness()(None))
    assert response.status_code == 200 and response.body == b'{"status":"ok"}'


def test_replicas_get_the_settings_that_differ_from_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SD3SERVE_THREADS", raising=False)
    key = "Zq8-Lm3_xR7vTn2pWk5YcJ4hFd9sGb6aE1uQo0iN"
    settings = Settings(data_dir=tmp_path, max_queue=7, admin_key=SecretStr(key))
    out = overrides(settings)
    assert out["max_queue"] == 7 and out["admin_key"] == key and out["data_dir"] == tmp_path
    assert "heartbeat_s" not in out and "port" not in out  # defaults are left to the replica's own Settings
    assert Settings(**out).max_queue == 7
    assert "admin_key" not in overrides(Settings(data_dir=tmp_path))
    assert overrides(Settings(data_dir=tmp_path)) == {"data_dir": tmp_path}


def test_the_serve_options_follow_the_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_queue=9, shutdown_grace_s=20)
    options = replica_options(settings, replicas=3, num_cpus=2, num_gpus=1)
    assert options["num_replicas"] == 3
    assert options["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1}
    assert options["max_ongoing_requests"] == MAX_ONGOING_REQUESTS == 16
    assert options["max_queued_requests"] == 9  # SD3SERVE_MAX_QUEUE
    assert options["backpressure_config"] == {"retry_after_s": RETRY_AFTER_S} and RETRY_AFTER_S == 5
    assert options["graceful_shutdown_timeout_s"] == 30  # the drain grace, and time to stop after it
    assert options["logging_config"] == {"enable_access_log": False}


# glibc's malloc settings as environment variables (sd3serve.allocator's TUNING, by glibc's names)
MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "2147483647",
              "MALLOC_TOP_PAD_": str(64 * 2**20)}  # fmt: skip


def test_a_cpu_replica_gets_the_allocator_settings_in_its_environment(tmp_path: Path) -> None:
    """Ray starts a replica's process with threads of its own, too late for mallopt: glibc reads the environment."""
    on_cpu = replica_options(Settings(data_dir=tmp_path), replicas=1, num_cpus=1, num_gpus=0)["ray_actor_options"]
    assert on_cpu["runtime_env"] == {"env_vars": MALLOC_ENV}
    off = Settings(data_dir=tmp_path, malloc_tuning="off")
    assert "runtime_env" not in replica_options(off, replicas=1, num_cpus=1, num_gpus=0)["ray_actor_options"]
    forced = Settings(data_dir=tmp_path, malloc_tuning="on")
    assert "runtime_env" in replica_options(forced, replicas=1, num_cpus=1, num_gpus=1)["ray_actor_options"]


class Remote:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    async def remote(self, *args: Any) -> Any:
        return self.fn(*args)


def replica(board: ReplicaBoard, state: Any = None, heartbeat_s: float = 5.0) -> SD3Replica:
    """A replica as Ray would have built it, without Ray: its name, its board, and (once started) its app state."""
    r = SD3Replica.__new__(SD3Replica)
    r.replica, r.node, r.threads = "me", "node-1", {}
    r.settings = Settings(heartbeat_s=heartbeat_s)
    r.board = SimpleNamespace(push=Remote(board.push), snapshot=Remote(board.snapshot))  # type: ignore[assignment]
    r.api = SimpleNamespace(state=SimpleNamespace(sd3=state)) if state is not None else None  # type: ignore[assignment]
    return r


class Engine:
    def __init__(self, healthy: bool) -> None:
        self.healthy = healthy

    def stats(self) -> Any:
        return SimpleNamespace(ready=self.healthy, queued=2, running=1)

    async def check_health(self) -> None:
        if not self.healthy:
            raise RuntimeError("a batching worker has stopped")


def state(healthy: bool = True) -> Any:
    from sd3serve.service.metrics import Metrics

    metrics = Metrics()
    metrics.images.inc(3)
    metrics.observe_engine = lambda stats: None  # type: ignore[method-assign]
    return SimpleNamespace(model_engine=Engine(healthy), metrics=metrics, ledger=SimpleNamespace(instance_id="inst-9"))


def test_readyz_counts_ready_and_starting_replicas() -> None:
    board = ReplicaBoard()
    board.push(report("other-ready"))
    board.push(report("other-starting", ready=False))
    response = asyncio.run(replica(board, state())._readyz())
    assert response.status_code == 200
    assert response.body == b'{"status":"ready","replicas":{"ready":2,"starting":1}}'


def test_readyz_is_503_while_this_replica_has_not_started_or_is_unhealthy() -> None:
    board = ReplicaBoard()
    board.push(report("other-ready"))
    starting = asyncio.run(replica(board)._readyz())
    assert starting.status_code == 503 and b'"replicas":{"ready":1,"starting":1}' in starting.body
    assert b"has not started" in starting.body
    broken = asyncio.run(replica(ReplicaBoard(), state(healthy=False))._readyz())
    assert broken.status_code == 503 and b"a batching worker has stopped" in broken.body


def test_a_replicas_report_says_what_it_runs() -> None:
    import sd3serve

    before = replica(ReplicaBoard())._report()
    assert (before.replica, before.node, before.ready, before.instance) == ("me", "node-1", False, "")
    assert before.package == sd3serve.__file__ and before.pid > 0 and before.metrics == []
    after = replica(ReplicaBoard(), state())._report()
    assert (after.ready, after.queued, after.running, after.instance) == (True, 2, 1, "inst-9")
    images = next(f for f in after.metrics if f.name == "sd3serve_images")
    assert [(s.labels, s.value) for s in images.samples if s.name == "sd3serve_images_total"] == [
        ({"replica": "me"}, 3.0)
    ]


def test_metrics_answer_for_every_replica_on_the_board() -> None:
    board = ReplicaBoard()
    board.push(report("other", metrics=labelled(families(4), "other")))
    response = asyncio.run(replica(board, state())._metrics())
    text = response.body.decode()
    assert response.media_type.startswith("text/plain")
    assert 'sd3serve_requests_total{replica="other",status="200"} 4.0' in text
    assert 'sd3serve_images_total{replica="me"} 3.0' in text


def test_old_reports_are_not_counted_by_readyz() -> None:
    board = ReplicaBoard()
    board.push(report("gone"))
    board._reports["gone"].at -= 16  # three heartbeats of 5 s and more
    response = asyncio.run(replica(board, state(), heartbeat_s=5.0)._readyz())
    assert response.body == b'{"status":"ready","replicas":{"ready":1,"starting":0}}'


def test_run_task_and_health_need_a_started_application() -> None:
    built = replica(ReplicaBoard())
    built.api = SimpleNamespace(state=SimpleNamespace())  # type: ignore[assignment]  # app built, lifespan not run
    with pytest.raises(RuntimeError, match="has not started"):
        asyncio.run(built.check_health())
    idle = replica(ReplicaBoard())
    with pytest.raises(RuntimeError, match="has not started"):
        asyncio.run(idle.check_health())
    with pytest.raises(RuntimeError, match="has not started"):
        asyncio.run(idle.run_task(None, "owner", None, "task"))
    asyncio.run(replica(ReplicaBoard(), state()).check_health())


def test_the_module_names_its_applications() -> None:
    assert (scaleout.APP_NAME, scaleout.HEALTH_APP, scaleout.REPLICA_HEADER) == (
        "sd3serve", "sd3serve-health", "x-sd3serve-replica")  # fmt: skip


# --- building the applications and running the cluster, with Ray's calls recorded instead of made ----------------


def test_the_liveness_app_is_its_own_deployment_without_cpus() -> None:
    deployment = scaleout.health_app()._bound_deployment  # Ray's Application -> its Deployment
    assert deployment.func_or_class is Liveness and deployment.name == "Liveness"
    assert deployment.ray_actor_options == {"num_cpus": 0}


def test_the_app_is_the_replicas_bound_to_their_board_with_the_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, max_queue=3)
    replicas = scaleout.build_app(settings, options={"num_replicas": 2})._bound_deployment
    assert replicas.name == "SD3Replica" and replicas.func_or_class.__name__ == "SD3Replica"
    assert replicas.num_replicas == 2
    given, board, origin = replicas.init_args
    assert given == overrides(settings)
    # The node the app was built on (None outside a Ray driver; the Ray tests may have started one here).
    import ray

    assert origin == (ray.get_runtime_context().get_node_id() if ray.is_initialized() else None)
    assert board._bound_deployment.func_or_class is ReplicaBoard
    assert board._bound_deployment.ray_actor_options == {"num_cpus": 0}


def test_a_replicas_app_answers_metrics_and_readiness_for_the_cluster_and_names_the_replica(tmp_path: Path) -> None:
    board = ReplicaBoard()
    board.push(report("other", metrics=labelled(families(4), "other")))
    built = replica(board)
    built.settings = Settings(data_dir=tmp_path, device="cpu")
    client = TestClient(built.__serve_build_asgi_app__())  # no lifespan: the model is not loaded
    metrics = client.get("/metrics")
    assert metrics.headers[REPLICA_HEADER] == "me"
    assert 'sd3serve_requests_total{replica="other",status="200"} 4.0' in metrics.text  # the board's, not the app's
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["replicas"] == {"ready": 1, "starting": 1}
    assert built.api is not None  # the app the lifespan will start


def test_the_replicas_deployment_handle_is_looked_up_once_in_its_own_application(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups: list[tuple[str, str]] = []
    context = SimpleNamespace(deployment="SD3Replica", app_name="sd3serve")
    monkeypatch.setattr(scaleout.serve, "get_replica_context", lambda: context)

    def handle(deployment: str, *, app_name: str) -> str:
        lookups.append((deployment, app_name))
        return f"handle of {deployment}"

    monkeypatch.setattr(scaleout.serve, "get_deployment_handle", handle)
    built = replica(ReplicaBoard())
    built._handle = None
    assert built._deployment() == built._deployment() == "handle of SD3Replica"
    assert lookups == [("SD3Replica", "sd3serve")]


class FakeCluster:
    """ray and serve as serve_forever calls them, recording each call; signals are blocked and awaited in name."""

    def __init__(self, resources: dict[str, float]) -> None:
        self.resources = resources
        self.calls: list[tuple[str, Any]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        record = lambda name: lambda *a, **kw: self.calls.append((name, (a, kw)))  # noqa: E731
        ray = SimpleNamespace(init=record("ray.init"), shutdown=record("ray.shutdown"),
                              cluster_resources=lambda: dict(self.resources),
                              is_initialized=lambda: False)  # fmt: skip
        serve = SimpleNamespace(start=record("serve.start"), shutdown=record("serve.shutdown"),
                                run=lambda app, *, name, route_prefix: self.calls.append(("serve.run",
                                                                                          (name, route_prefix, app))),
                                deployment=scaleout.serve.deployment, ingress=scaleout.serve.ingress)  # fmt: skip
        sig = SimpleNamespace(SIGINT=2, SIGTERM=15, SIG_BLOCK=0, pthread_sigmask=record("sigmask"),
                              sigwait=lambda signals: self.calls.append(("sigwait", set(signals))) or 15)  # fmt: skip
        monkeypatch.delenv("SD3SERVE_THREADS", raising=False)  # `make mutate` sets it: the CPU split is under test
        monkeypatch.setattr(scaleout, "ray", ray)
        monkeypatch.setattr(scaleout, "serve", serve)
        monkeypatch.setattr(scaleout, "signal", sig)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    def first(self, name: str) -> Any:
        return next(args for n, args in self.calls if n == name)


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for name in scaleout.LOCAL_RAY_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.usefixtures("local_env")
def test_serve_forever_starts_a_local_cluster_shares_its_cpus_and_stops_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = FakeCluster({"CPU": 4})
    cluster.install(monkeypatch)
    settings = Settings(data_dir=tmp_path, device="auto", host="0.0.0.0", port=9123)
    assert scaleout.serve_forever(settings, replicas=2) == 0
    assert cluster.first("ray.init")[1] == {"address": "local", "num_cpus": scaleout.available_cores(),
                                            "include_dashboard": False}  # fmt: skip
    assert all(os.environ[k] == v for k, v in scaleout.LOCAL_RAY_ENV.items())  # Ray's processes inherit them
    assert cluster.first("serve.start")[1] == {"http_options": {"host": "0.0.0.0", "port": 9123}}
    runs = [args for name, args in cluster.calls if name == "serve.run"]
    assert [(n, prefix) for n, prefix, _ in runs] == [(scaleout.HEALTH_APP, "/healthz"), (scaleout.APP_NAME, "/")]
    replicas = runs[1][2]._bound_deployment
    assert replicas.num_replicas == 2
    assert replicas.ray_actor_options == {"num_cpus": 2, "num_gpus": 0, "runtime_env": {"env_vars": MALLOC_ENV}}
    assert cluster.first("sigwait") == {2, 15}
    assert cluster.names()[-2:] == ["serve.shutdown", "ray.shutdown"]


def test_serve_forever_joins_the_cluster_of_ray_address_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    for name in scaleout.LOCAL_RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    cluster = FakeCluster({"CPU": 32, "GPU": 4})
    cluster.install(monkeypatch)
    assert scaleout.serve_forever(Settings(data_dir=tmp_path, device="auto"), replicas=4) == 0
    assert cluster.first("ray.init")[1] == {"address": "ray://head:10001", "num_cpus": None, "include_dashboard": False}
    assert not any(name in os.environ for name in scaleout.LOCAL_RAY_ENV)  # the cluster's own settings stand
    replicas = [args for name, args in cluster.calls if name == "serve.run"][1][2]._bound_deployment
    assert replicas.ray_actor_options == {"num_cpus": 8, "num_gpus": 1}  # GPUs found: one per replica


@pytest.mark.usefixtures("local_env")
@pytest.mark.parametrize(("device", "resources", "replicas", "has"), [
    ("auto", {"CPU": 8, "GPU": 1}, 2, 1),
    ("cuda", {"CPU": 8}, 1, 0),
])  # fmt: skip
def test_serve_forever_refuses_more_gpu_replicas_than_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], device: str,
    resources: dict[str, float], replicas: int, has: int,
) -> None:  # fmt: skip
    cluster = FakeCluster(resources)
    cluster.install(monkeypatch)
    assert scaleout.serve_forever(Settings(data_dir=tmp_path, device=device), replicas=replicas) == 2
    err = capsys.readouterr().err
    assert f"{replicas} replicas need {replicas} GPUs; this cluster has {has}" in err
    assert "serve.run" not in cluster.names() and cluster.names()[-1] == "ray.shutdown"


@pytest.mark.usefixtures("local_env")
def test_serve_forever_on_a_cpu_cluster_uses_no_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = FakeCluster({"CPU": 2})
    cluster.install(monkeypatch)
    assert scaleout.serve_forever(Settings(data_dir=tmp_path, device="auto", threads=1), replicas=3) == 0
    replicas = [args for name, args in cluster.calls if name == "serve.run"][1][2]._bound_deployment
    assert replicas.ray_actor_options == {"num_cpus": 1, "num_gpus": 0,  # SD3SERVE_THREADS when set
                                          "runtime_env": {"env_vars": MALLOC_ENV}}  # fmt: skip
