"""Serving throughput and latency: the engine on its own, this server, and a naive server, interleaved.

    .venv/bin/python bench/serving.py [--sizes 512] [--concurrency 1 4] [--requests 100] [--model DIR]
                                      [--wait-policy PASSIVE|ACTIVE|unset] [--threads 0] [--processes 3]
                                      [--calls 20]

Three systems, each in its own process started with the same thread environment (OMP_WAIT_POLICY, and torch's
thread count from SD3SERVE_THREADS), each running torch on one dedicated thread that loads the model and runs
every request:
  sequential: the engine (pipeline + JPEG) called one request at a time, no HTTP (bench/engine_worker.py);
  server:     `sd3serve serve`, c client threads;
  naive:      bench/naive_server.py (diffusers' pipeline behind one FastAPI route), c client threads.
Each system runs in `--processes` processes (3 by default): a process's speed depends on its allocation history
(page faults), so round r goes to process r mod N of each system. The systems take turns round by round: a round
is c requests to one system at once (c one after another for sequential), and the order of the three rotates
every round, so machine noise falls on all of them alike.
Prints images/s, p50/p99/max latency, minor page faults and CPU seconds (user + system, every thread of the
process) per image (/proc/PID/stat, counted around each round) per system (p99 is the nearest rank: with fewer than
100 requests it is the max), then the ratios, then Python function calls per request of the two HTTP servers (each
run once more under bench/callcount.py, never timed), then the batching gain (one pass over a batch of 4 against 4
passes, in the engine's process). Faults and CPU seconds are counts of work done, which other jobs' load bends far
less than time: under load the images/s ratio can fall while the CPU seconds show the same work. Compare ratios, not
absolute times across runs: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the demo model's tooling: sd3demo
import sd3serve as sd3serve_package
from common import BENCH_DIR, URL, EngineWorker, free_port, proc_counts, rich_key, sd3serve, thread_env, wait_ready
from sd3demo.world import POSITIONS, all_triples
from sd3serve.threads import available_cores, describe

# Every request of a run has a prompt of its own, so the server's prompt-embedding cache never hits: the three
# systems do the same work (2,520 captions of the demo world; they repeat past that).
PROMPTS = [f"a {c} {s} at the {p} on a {b} background" for c, s, b in all_triples() for p in POSITIONS]
SYSTEMS = ("sequential", "server", "naive")
# The threads that run the model: the server's engine workers, the naive server's one executor thread.
MODEL_THREADS = ("sd3-engine", "ThreadPoolExecutor")


def percentile(xs: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q of the values at or below it."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def timed_round(calls: Sequence[Callable[[], None]], concurrency: int) -> tuple[float, list[float]]:
    """(wall seconds, per-call latencies) of the calls made from `concurrency` threads at once."""

    def timed(call: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(timed, calls))
    return time.perf_counter() - t0, latencies


class Naive:
    """bench/naive_server.py in a process of its own."""

    def __init__(self, model_dir: Path, env: dict[str, str], launcher: Sequence[str] = ()) -> None:
        port = free_port()
        self.proc = subprocess.Popen([sys.executable, *launcher, str(BENCH_DIR / "naive_server.py"), str(model_dir),
                                      str(port)], env=env)  # fmt: skip
        self.url, self.pid = f"http://127.0.0.1:{port}", self.proc.pid
        wait_ready(self.url, self.proc)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=100, help="per system and cell (100 or more for a p99)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    ap.add_argument("--wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of every system, or 'unset'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every system (0: the cores available)")
    ap.add_argument("--processes", type=int, default=3, help="processes per system; rounds go to each in turn")
    ap.add_argument("--calls", type=int, default=20, help="requests counted for Python calls per request (0: skip)")
    ap.add_argument("--fairness", type=int, default=40, help="small requests timed beside a large one (0: skip)")
    args = ap.parse_args()

    env = thread_env(None if args.wait_policy == "unset" else args.wait_policy, args.threads)
    data_dir = Path(tempfile.mkdtemp(prefix="sd3serving-"))
    key = rich_key(data_dir)
    model_dir = args.model or Path(sd3serve_package.__file__).parent / "models" / "demo"  # the embedded demo model
    with contextlib.ExitStack() as stack:
        server_log = stack.enter_context((data_dir / "server.log").open("w+"))
        ours = [stack.enter_context(sd3serve(data_dir, args.model, env=env, stderr=server_log, max_queue=1000,
                                             log_level="info")) for _ in range(args.processes)]  # fmt: skip
        naives = [Naive(model_dir, env) for _ in range(args.processes)]
        for naive in naives:
            stack.callback(naive.close)
        engines = [EngineWorker(env, args.model) for _ in range(args.processes)]
        for engine in engines:
            stack.callback(engine.close)
        client = stack.enter_context(httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=64)))

        server_log.seek(0)
        server_threads = re.search(r"threads: (torch_threads.*)", server_log.read())
        report = engines[0].report
        print(f"machine: {available_cores()} cores available to this process (os.sched_getaffinity)")
        print(f"  sequential: {describe({k: v for k, v in report.items() if k not in ('ready', 'placement')})}")
        print(f"  server:     {server_threads.group(1) if server_threads else '(not in its log)'}")
        print(f"  naive:      {describe(client.get(f'{naives[0].url}/threads').json())}")
        print(f"model: {model_dir}; {args.requests} requests per system and cell, {args.steps} steps, "
              f"dpmpp_2m/sgm_uniform, {args.processes} processes per system, interleaved round by round")  # fmt: skip
        print(f"{'size':>5} {'conc':>4} {'system':<11} {'img/s':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7} "
              f"{'faults/img':>10} {'CPU s/img':>9}")  # fmt: skip

        summary = []
        request_ids = itertools.count()  # the prompt and seed of a request: each used once per system
        pids = {"sequential": [e.proc.pid for e in engines], "server": [o.pid for o in ours],
                "naive": [n.pid for n in naives]}  # fmt: skip
        for size in args.sizes:

            def body(i: int, size: int = size) -> dict[str, object]:
                return {"prompt": PROMPTS[i % len(PROMPTS)], "width": size, "height": size, "steps": args.steps,
                        "seed": i}  # fmt: skip

            def sequential(p: int, i: int, size: int = size) -> None:
                engines[p].call("generate", prompt=PROMPTS[i % len(PROMPTS)], size=size, steps=args.steps, seed=i)

            def server(p: int, i: int) -> None:
                client.post(f"{ours[p].url}{URL}", json=body(i), headers={"x-api-key": key}).raise_for_status()

            def naive_call(p: int, i: int) -> None:
                client.post(f"{naives[p].url}/generate", json=body(i)).raise_for_status()

            calls = {"sequential": sequential, "server": server, "naive": naive_call}
            for p in range(args.processes):
                warm = next(request_ids)
                for call in calls.values():
                    call(p, warm)  # warm-up at this size, in every process
            for c in args.concurrency:
                walls = dict.fromkeys(SYSTEMS, 0.0)
                faults = dict.fromkeys(SYSTEMS, 0)
                cpu = dict.fromkeys(SYSTEMS, 0.0)
                latencies: dict[str, list[float]] = {name: [] for name in SYSTEMS}
                for r in range(math.ceil(args.requests / c)):
                    ids = [next(request_ids) for _ in range(min(c, args.requests - r * c))]
                    p = r % args.processes
                    for name in SYSTEMS[r % 3 :] + SYSTEMS[: r % 3]:
                        fns = [functools.partial(calls[name], p, i) for i in ids]
                        faults_before, cpu_before = proc_counts(pids[name][p])
                        wall, lat = timed_round(fns, 1 if name == "sequential" else c)
                        faults_after, cpu_after = proc_counts(pids[name][p])
                        faults[name] += faults_after - faults_before
                        cpu[name] += cpu_after - cpu_before
                        walls[name] += wall
                        latencies[name] += lat
                row = {}
                for name in SYSTEMS:
                    lat = latencies[name]
                    row[name] = (len(lat) / walls[name], percentile(lat, 0.5), percentile(lat, 0.99), max(lat),
                                 faults[name] / len(lat), cpu[name] / len(lat))  # fmt: skip
                    print(f"{size:>5} {c:>4} {name:<11} " + " ".join(f"{x:>7.3f}" for x in row[name][:4])
                          + f" {row[name][4]:>10.0f} {row[name][5]:>9.3f}", flush=True)  # fmt: skip
                summary.append((size, c, row))

        print("\nratios (sequential latency is one request's own time: it never queues)")
        print(f"{'size':>5} {'conc':>4} {'server/sequential img/s':>24} {'server/naive img/s':>19} "
              f"{'server/naive p99':>17} {'naive/server CPU s per image':>29}")  # fmt: skip
        for size, c, row in summary:
            s, q, n = row["server"], row["sequential"], row["naive"]
            print(f"{size:>5} {c:>4} {s[0] / q[0]:>24.3f} {s[0] / n[0]:>19.3f} {s[2] / n[2]:>17.3f} "
                  f"{n[5] / s[5]:>29.3f}")  # fmt: skip

        if args.fairness:
            fairness(client, ours[0].url, key, size=args.sizes[0], steps=args.steps, requests=args.fairness)

        print("\nbatching gain: a batch of 4 in one pass vs 4 passes (the engine's process)")
        for exact in (True, False):
            label = "exact batches (bit-identical)" if exact else "fast batches (one forward)"
            for size in args.sizes:
                gain = engines[0].call("batching", size=size, steps=args.steps, exact=exact)["speedup"]
                print(f"  {size}x{size} {label:<30} speed-up {gain:.3f}x")

    if args.calls:
        python_calls(env, data_dir, key, model_dir, args.model, size=args.sizes[0], steps=args.steps, n=args.calls)


def python_calls(env: dict[str, str], data_dir: Path, key: str, model_dir: Path, model: Path | None, *, size: int,
                 steps: int, n: int) -> None:  # fmt: skip
    """Python function calls per request of each HTTP server (bench/callcount.py), by thread: what the HTTP layer
    costs beside the model. Counted, never timed (the profiler slows every call)."""
    launcher = [str(BENCH_DIR / "callcount.py")]
    body = {"prompt": PROMPTS[0], "width": size, "height": size, "steps": steps}
    print(f"\nPython calls per request ({n} requests one after another, {size}x{size}, {steps} steps)")
    with contextlib.ExitStack() as stack, httpx.Client(timeout=3600) as client:
        counts_file = data_dir / "calls.json"
        env = {**env, "SD3BENCH_CALLS_FILE": str(counts_file)}
        ours = stack.enter_context(sd3serve(data_dir, model, env=env, launcher=launcher, max_queue=1000))
        naive = Naive(model_dir, env, launcher)
        stack.callback(naive.close)
        systems = {"server": (ours.pid, f"{ours.url}{URL}", {"x-api-key": key}),
                   "naive": (naive.pid, f"{naive.url}/generate", {})}  # fmt: skip
        for name, (pid, url, headers) in systems.items():

            def counts(pid: int = pid) -> dict[str, int]:
                counts_file.unlink(missing_ok=True)
                os.kill(pid, signal.SIGUSR1)
                while not counts_file.exists():
                    time.sleep(0.01)
                return dict(json.loads(counts_file.read_text()))

            client.post(url, json={**body, "seed": 0}, headers=headers).raise_for_status()  # warm
            before = counts()
            for i in range(n):
                client.post(url, json={**body, "seed": i + 1}, headers=headers).raise_for_status()
            after = counts()
            per_thread = {t: (after[t] - before.get(t, 0)) / n for t in after if after[t] > before.get(t, 0)}
            model_side = sum(c for t, c in per_thread.items() if t.startswith(MODEL_THREADS))
            top = ", ".join(f"{t}: {c:.0f}" for t, c in sorted(per_thread.items(), key=lambda kv: -kv[1])[:4])
            print(f"  {name:<7} {sum(per_thread.values()):>8.0f} in all, {model_side:>7.0f} on the model's thread, "
                  f"{sum(per_thread.values()) - model_side:>7.0f} elsewhere (HTTP, encoding)  [{top}]")


def fairness(client: httpx.Client, url: str, key: str, *, size: int, steps: int, requests: int) -> None:
    """Latency of small requests (1 image) alone, then while a large one (10 images) keeps the server busy: the
    large request runs a batch's worth at a time and lets queued requests in between."""
    h = {"x-api-key": key}
    small = {"prompt": PROMPTS[0], "width": size, "height": size, "steps": steps}
    large = {**small, "prompt": PROMPTS[1], "batch_size": 10, "base64": True}

    def one(body: dict[str, object], i: int) -> float:
        t0 = time.perf_counter()
        client.post(f"{url}{URL}", json={**body, "seed": i}, headers=h).raise_for_status()
        return time.perf_counter() - t0

    alone = [one(small, i) for i in range(requests)]
    stop, large_times = threading.Event(), []

    def keep_busy() -> None:
        while not stop.is_set():
            large_times.append(one(large, len(large_times)))

    busy = threading.Thread(target=keep_busy)
    busy.start()
    time.sleep(max(alone))  # the first large request is on the model
    beside = [one(small, i) for i in range(requests)]
    stop.set()
    busy.join()
    print(f"\nfairness ({size}x{size}, {steps} steps, server): {requests} small requests (1 image), alone and while "
          "a 10-image request keeps the server busy")  # fmt: skip
    print(f"  alone:          p50 {percentile(alone, 0.5):.3f} s  p99 {percentile(alone, 0.99):.3f} s")
    print(
        f"  beside a large: p50 {percentile(beside, 0.5):.3f} s  p99 {percentile(beside, 0.99):.3f} s "
        f"(ratio p99 {percentile(beside, 0.99) / percentile(alone, 0.99):.2f}x)"
    )
    print(
        f"  the large request took {statistics.median(large_times):.3f} s (median of {len(large_times)}): "
        "what a small one would wait without yielding"
    )


if __name__ == "__main__":
    main()
