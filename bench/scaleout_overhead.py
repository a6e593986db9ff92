"""Where Ray Serve's extra latency goes, one replica against the plain server, at c=1: counts that load does not
bend (CPU seconds and minor page faults per request, per process of each system's process tree) beside the
latencies, interleaved request by request.

Three systems run `sd3serve serve` with 2 torch threads on the demo model: plain, `--replicas 1` as it starts its
own Ray cluster (sd3serve.scaleout.LOCAL_RAY_ENV), and `--replicas 1` with Ray's defaults instead. For
each request size (a tiny one, 64² and 1 step, shows the fixed cost of the path; 512² and 4 steps the real one)
it prints p50 latency per system and, for the Ray system, each kind of process's CPU milliseconds and minor
faults per request (the replica, Serve's proxy and controller, Ray's raylet / GCS / agents, the driver).

    PYTHONPATH=src:bench python bench/scaleout_overhead.py [--requests 30]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx
import psutil

from common import URL, rich_key
from scaleout import system

# Ray's own values of what sd3serve.scaleout.LOCAL_RAY_ENV changes: the third system runs with them.
RAY_DEFAULTS = {
    "RAY_worker_niceness": "15",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1",
}
SIZES = {"tiny": {"width": 64, "height": 64, "steps": 1}, "512² 4 steps": {"width": 512, "height": 512, "steps": 4}}


def kind(p: psutil.Process) -> str:
    """A process of the tree, by role."""
    try:
        name, cmd = p.name(), " ".join(p.cmdline())
    except psutil.Error:
        return "gone"
    for role in ("SD3Replica", "ProxyActor", "ServeController", "ReplicaBoard", "Liveness", "DashboardAgent",
                 "RuntimeEnvAgent"):  # fmt: skip
        if role in name or role in cmd:
            return role
    if "gcs_server" in name or "raylet" in name:
        return name
    if "sd3serve" in cmd and " serve" in cmd:
        return "driver (sd3serve serve)"
    return "other ray"


def counters(root: int) -> dict[str, tuple[float, int]]:
    """CPU seconds and minor faults of every process in the tree, summed by kind."""
    out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    top = psutil.Process(root)
    for p in [top, *top.children(recursive=True)]:
        with contextlib.suppress(psutil.Error, OSError):
            t = p.cpu_times()
            faults = int(Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # minflt
            k = kind(p)
            out[k][0] += t.user + t.system
            out[k][1] += faults
    return {k: (v[0], int(v[1])) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30, help="requests per system and size")
    a = parser.parse_args()
    names = ("plain", "ray-1", "ray-1-defaults")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        urls, keys, pids = {}, {}, {}
        for name in names:
            data_dir = root / name
            data_dir.mkdir()
            keys[name] = rich_key(data_dir)
            like, extra = ("ray-1", RAY_DEFAULTS) if name == "ray-1-defaults" else (name, {})
            urls[name], pids[name] = stack.enter_context(
                system(name, data_dir, root / f"{name}.log", with_pid=True, like=like, extra_env=extra)
            )
        client = stack.enter_context(httpx.Client(timeout=300))

        def call(name: str, body: dict[str, object]) -> float:
            start = time.perf_counter()
            r = client.post(urls[name] + URL, json=body, headers={"x-api-key": keys[name]})
            r.raise_for_status()
            return time.perf_counter() - start

        for size, shape in SIZES.items():
            for name in names:  # warm-up
                for i in range(3):
                    call(name, {"prompt": f"warm {i}", **shape})
            lat: dict[str, list[float]] = {n: [] for n in names}
            before = {n: counters(pids[n]) for n in names}
            for i in range(a.requests):
                for name in names:
                    lat[name].append(call(name, {"prompt": f"a red circle number {i}", "seed": i, **shape}))
            after = {n: counters(pids[n]) for n in names}
            p50 = {n: statistics.median(lat[n]) for n in names}
            print(f"\n{size}, c=1, {a.requests} requests per system, interleaved")
            ratio = {n: p50[n] / p50["plain"] for n in names}
            print("p50 latency: " + ", ".join(f"{n} {p50[n] * 1e3:.0f} ms" for n in names) + "; / plain: "
                  + ", ".join(f"{n} {ratio[n]:.2f}" for n in names[1:]) + "\n")  # fmt: skip
            print("| system | process | CPU ms / request | minor faults / request |")
            print("| --- | --- | --- | --- |")
            for name in names:
                for k in sorted(after[name], key=lambda k: -(after[name][k][0] - before[name].get(k, (0, 0))[0])):
                    cpu = (after[name][k][0] - before[name].get(k, (0.0, 0))[0]) / a.requests * 1e3
                    faults = (after[name][k][1] - before[name].get(k, (0.0, 0))[1]) / a.requests
                    if cpu >= 0.5 or faults >= 50:
                        print(f"| {name} | {k} | {cpu:.1f} | {faults:.0f} |")
            print(file=sys.stderr)


if __name__ == "__main__":
    main()
