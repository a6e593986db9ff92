"""Scale-out on Ray Serve against the plain server, side by side in one run.

Three systems, all started at once, each in its own process tree, on the embedded demo model: plain
`sd3serve serve` with 2 torch threads, `sd3serve serve --replicas 1 --threads 2` (Ray Serve, one replica) and
`sd3serve serve --replicas 2 --threads 1` (two replicas of one thread). They take turns round by round (a round:
c requests at once to one system), every request with its own prompt (no prompt-cache hits), 512², 4 steps.
Prints images/s, p50 and p99 (nearest rank) per system and concurrency, minor page faults and CPU seconds per
image of each system's whole process tree (the server, or Ray's driver, its own processes and the replicas:
`/proc/PID/stat`, reaped processes included), and the ratios the issue sets targets for: Ray(1) / plain
latency at c=1 (≤ 1.10) and Ray(2) / Ray(1) images/s at c=16 (≥ 1.3). Then the v2 row:
each round submits ``--v2`` tasks to one system at once and waits until all are COMPLETED (images/s from the
first submission to the last completion), systems in turn. Last, ``--calls N``: each system started once more
with every Python process of its tree counting its function calls (bench/callcount_site; never timed), N
requests one after another, and the calls per request by process (the server; Ray's proxy, the replica, the
rest of Ray's processes), Ray's periodic work during those requests included.

    PYTHONPATH=src python bench/scaleout.py [--requests 48] [--v2 16] [--v2-rounds 2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from common import URL, free_port, rich_key, tree_counts, v2_round

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
PROMPTS = [f"a {c} {s} at the {p}" for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]
SYSTEMS = {  # name: (extra arguments of `sd3serve serve`, torch threads per process)
    "plain": ([], 2),
    "ray-1": (["--replicas", "1"], 2),
    "ray-2": (["--replicas", "2"], 1),
}
CONCURRENCY = (1, 4, 16)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


@contextlib.contextmanager
def system(
    name: str,
    data_dir: Path,
    log: Path,
    *,
    with_pid: bool = False,
    like: str = "",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """The system's URL once ready (and its process id, ``with_pid``), until the block ends; ``like``: the entry
    of ``SYSTEMS`` to run under this name (default: ``name``), with ``extra_env`` in its environment."""
    args, threads = SYSTEMS[like or name]
    port = free_port()
    env = {**os.environ, "SD3SERVE_DATA_DIR": str(data_dir), "SD3SERVE_PORT": str(port), "SD3SERVE_DEVICE": "cpu",
           "SD3SERVE_LOG_LEVEL": "warning", "SD3SERVE_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
           "HF_HUB_OFFLINE": "1", "SD3SERVE_MAX_QUEUE": "256", **(extra_env or {})}  # fmt: skip
    env.pop("RAY_ADDRESS", None)  # each Ray system starts a cluster of its own
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sd3serve", "serve", *args], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    replicas = int(args[1]) if args else 0
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{name} did not start: {log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                r = httpx.get(f"{url}/readyz", timeout=5)
                if r.status_code == 200 and r.json().get("replicas", {}).get("ready", 0) >= replicas:
                    break
            time.sleep(0.5)
        yield (url, proc.pid) if with_pid else url
    finally:
        proc.terminate()  # the Ray systems stop Serve and their cluster on SIGTERM
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=48, help="requests per system and concurrency")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--v2", type=int, default=16, help="v2 tasks submitted at once per round (0: no v2 row)")
    parser.add_argument("--v2-rounds", type=int, default=2)
    parser.add_argument("--skip-v1", action="store_true", help="only the v2 row")
    parser.add_argument("--calls", type=int, default=10, help="requests counted for Python calls (0: skip)")
    a = parser.parse_args()
    prompts = itertools.cycle(PROMPTS)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        urls, keys, pids = {}, {}, {}
        for name in SYSTEMS:
            data_dir = root / name
            data_dir.mkdir()
            keys[name] = rich_key(data_dir)
            urls[name], pids[name] = stack.enter_context(system(name, data_dir, root / f"{name}.log", with_pid=True))
            print(f"{name} ready: {urls[name]}", file=sys.stderr)
        client = stack.enter_context(httpx.Client(timeout=300, limits=httpx.Limits(max_connections=64)))
        pool = stack.enter_context(ThreadPoolExecutor(max(CONCURRENCY)))

        def call(name: str, prompt: str) -> float:
            body = {"prompt": prompt, "width": a.size, "height": a.size, "steps": a.steps, "seed": 1}
            start = time.perf_counter()
            r = client.post(urls[name] + URL, json=body, headers={"x-api-key": keys[name]})
            r.raise_for_status()
            return time.perf_counter() - start

        for name in SYSTEMS:  # warm-up: every replica's first requests
            list(pool.map(lambda p, n=name: call(n, p), [next(prompts) for _ in range(4)]))

        def v2_bodies() -> Iterator[dict[str, object]]:
            for _ in range(a.v2):
                yield {"prompt": next(prompts), "width": a.size, "height": a.size, "steps": a.steps, "seed": 1}

        results: dict[tuple[str, int], tuple[float, list[float]]] = {}
        work: dict[tuple[str, int], tuple[float, float]] = {}  # faults and CPU seconds per image
        v2_busy = dict.fromkeys(SYSTEMS, 0.0)
        for _ in range(a.v2_rounds if a.v2 else 0):
            for name in SYSTEMS:
                v2_busy[name] += v2_round(client, urls[name], keys[name], v2_bodies())[0]
        if a.v2:
            print("v2 done", file=sys.stderr)
        for c in () if a.skip_v1 else CONCURRENCY:
            rounds = max(1, a.requests // c)
            busy = dict.fromkeys(SYSTEMS, 0.0)
            faults, cpu = dict.fromkeys(SYSTEMS, 0), dict.fromkeys(SYSTEMS, 0.0)
            latencies: dict[str, list[float]] = {n: [] for n in SYSTEMS}
            for _ in range(rounds):
                for name in SYSTEMS:
                    batch = [next(prompts) for _ in range(c)]
                    faults0, cpu0 = tree_counts(pids[name])
                    start = time.perf_counter()
                    latencies[name] += list(pool.map(lambda p, n=name: call(n, p), batch))
                    busy[name] += time.perf_counter() - start
                    faults1, cpu1 = tree_counts(pids[name])
                    faults[name] += faults1 - faults0
                    cpu[name] += cpu1 - cpu0
            for name in SYSTEMS:
                n = len(latencies[name])
                results[name, c] = (n / busy[name], latencies[name])
                work[name, c] = (faults[name] / n, cpu[name] / n)
            print(f"c={c} done", file=sys.stderr)

    if not a.skip_v1:
        print(f"\n{a.size}², {a.steps} steps, demo model, {os.cpu_count()} cores; rounds interleaved; "
              f"{a.requests} requests per cell (fewer when c does not divide it)\n")  # fmt: skip
        print("| concurrency | images/s: plain / ray-1 / ray-2 | p50 s: plain / ray-1 / ray-2 "
              "| p99 s: plain / ray-1 / ray-2 | ray-1 / plain p50 | ray-2 / ray-1 images/s "
              "| faults per image: plain / ray-1 / ray-2 | CPU s per image: plain / ray-1 / ray-2 |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for c in CONCURRENCY:
            ips = [results[n, c][0] for n in SYSTEMS]
            p50 = [percentile(results[n, c][1], 0.5) for n in SYSTEMS]
            p99 = [percentile(results[n, c][1], 0.99) for n in SYSTEMS]
            print(f"| {c} | {' / '.join(f'{x:.2f}' for x in ips)} | {' / '.join(f'{x:.3f}' for x in p50)} "
                  f"| {' / '.join(f'{x:.3f}' for x in p99)} | {p50[1] / p50[0]:.2f} "
                  f"| {ips[2] / ips[1]:.2f} | {' / '.join(f'{work[n, c][0]:,.0f}' for n in SYSTEMS)} "
                  f"| {' / '.join(f'{work[n, c][1]:.3f}' for n in SYSTEMS)} |")  # fmt: skip

    if a.v2:
        ips = [a.v2 * a.v2_rounds / v2_busy[n] for n in SYSTEMS]
        print(f"\nv2: {a.v2} tasks submitted at once, wait for all; {a.v2_rounds} round(s) per system\n")
        print("| v2 images/s: plain / ray-1 / ray-2 | ray-2 / ray-1 |")
        print("| --- | --- |")
        print(f"| {' / '.join(f'{x:.2f}' for x in ips)} | {ips[2] / ips[1]:.2f} |")

    if a.calls:
        python_calls(a, itertools.cycle(PROMPTS))


CALLCOUNT_SITE = Path(__file__).resolve().parent / "callcount_site"
# (group, what a process's title starts with), first match wins; the rest is "other Ray processes"
PROCESS_GROUPS = (("replica", "ray::ServeReplica:sd3serve:SD3Replica"), ("proxy", "ray::ProxyActor"),
                  ("sd3serve serve", f"{sys.executable} -m sd3serve serve"))  # the plain server, or Ray's driver


def call_counts(calls_dir: Path) -> dict[str, int]:
    """Python calls so far of every counted process under ``calls_dir``, summed by group (PROCESS_GROUPS)."""
    out: dict[str, int] = {}
    for f in calls_dir.glob("*.json"):
        with contextlib.suppress(ValueError, OSError):  # being replaced right now: it is read again next time
            seen = json.loads(f.read_text())
            group = next((g for g, prefix in PROCESS_GROUPS if seen["title"].startswith(prefix)), "other Ray")
            out[group] = out.get(group, 0) + sum(c for t, c in seen["counts"].items() if t != "sd3bench-callcount")
    return out


def python_calls(a: argparse.Namespace, prompts: Iterator[str]) -> None:
    """Each system once more, every Python process of its tree counting calls: calls per request by group."""
    print(f"\nPython calls per request ({a.calls} requests one after another, {a.size}², {a.steps} steps; Ray's "
          "periodic work during them included)\n")  # fmt: skip
    print("| system | calls per request | by process |")
    print("| --- | --- | --- |")
    for name in SYSTEMS:
        with tempfile.TemporaryDirectory() as tmp, httpx.Client(timeout=600) as client:
            root = Path(tmp)
            (root / "data").mkdir()
            (root / "calls").mkdir()
            key = rich_key(root / "data")
            env = {"SD3BENCH_CALLS_DIR": str(root / "calls"),
                   "PYTHONPATH": os.pathsep.join([str(CALLCOUNT_SITE), os.environ.get("PYTHONPATH", "")])}
            with system(name, root / "data", root / "log", extra_env=env) as url:

                def call(url: str = url, key: str = key) -> None:
                    body = {"prompt": next(prompts), "width": a.size, "height": a.size, "steps": a.steps, "seed": 1}
                    client.post(url + URL, json=body, headers={"x-api-key": key}).raise_for_status()

                for _ in range(2):
                    call()  # warm-up
                time.sleep(1.5)  # every process has written its counts since
                before = call_counts(root / "calls")
                for _ in range(a.calls):
                    call()
                time.sleep(1.5)
                after = call_counts(root / "calls")
            per = {g: (after[g] - before.get(g, 0)) / a.calls for g in after}
            by = ", ".join(f"{g} {c:,.0f}" for g, c in sorted(per.items(), key=lambda kv: -kv[1]) if c >= 1)
            print(f"| {name} | {sum(per.values()):,.0f} | {by} |", flush=True)


if __name__ == "__main__":
    main()
