"""Serving throughput and latency: the engine on its own, this server, and a naive server, interleaved.

    .venv/bin/python bench/serving.py [--sizes 512] [--concurrency 1 4] [--requests 100] [--model DIR]
                                      [--wait-policy PASSIVE|ACTIVE|unset] [--threads 0]

Three systems, each in its own process started with the same thread environment (OMP_WAIT_POLICY, and torch's
thread count from SD3SERVE_THREADS), each running torch on one dedicated thread that loads the model and runs
every request:
  sequential: the engine (pipeline + JPEG) called one request at a time, no HTTP (bench/engine_worker.py);
  server:     `sd3serve serve`, c client threads;
  naive:      bench/naive_server.py (diffusers' pipeline behind one FastAPI route), c client threads.
The systems take turns round by round: a round is c requests to one system at once (c one after another for
sequential), and the order of the three rotates every round, so machine noise falls on all of them alike.
Prints images/s and p50/p99/max latency per system (p99 is the nearest rank: with fewer than 100 requests it is
the max), then the ratios, then the batching gain (one pass over a batch of 4 against 4 passes, in the engine's
process). Compare ratios, not absolute times across runs: the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import re
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
from common import BENCH_DIR, URL, EngineWorker, free_port, rich_key, sd3serve, thread_env, wait_ready
from sd3demo.world import POSITIONS, all_triples
from sd3serve.threads import available_cores, describe

# Every request of a run has a prompt of its own, so the server's prompt-embedding cache never hits: the three
# systems do the same work (2,520 captions of the demo world; they repeat past that).
PROMPTS = [f"a {c} {s} at the {p} on a {b} background" for c, s, b in all_triples() for p in POSITIONS]
SYSTEMS = ("sequential", "server", "naive")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--requests", type=int, default=100, help="per system and cell (100 or more for a p99)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    ap.add_argument("--wait-policy", default="PASSIVE", help="OMP_WAIT_POLICY of every system, or 'unset'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of every system (0: the cores available)")
    ap.add_argument("--fairness", type=int, default=40, help="small requests timed beside a large one (0: skip)")
    args = ap.parse_args()

    env = thread_env(None if args.wait_policy == "unset" else args.wait_policy, args.threads)
    data_dir = Path(tempfile.mkdtemp(prefix="sd3serving-"))
    key = rich_key(data_dir)
    model_dir = args.model or Path(sd3serve_package.__file__).parent / "models" / "demo"  # the embedded demo model
    with contextlib.ExitStack() as stack:
        server_log = stack.enter_context((data_dir / "server.log").open("w+"))
        ours = stack.enter_context(
            sd3serve(data_dir, args.model, env=env, stderr=server_log, max_queue=1000, log_level="info")
        )
        naive_port = free_port()
        naive = subprocess.Popen([sys.executable, str(BENCH_DIR / "naive_server.py"), str(model_dir),
                                  str(naive_port)], env=env)  # fmt: skip
        stack.callback(naive.wait, timeout=60)
        stack.callback(naive.terminate)
        naive_url = f"http://127.0.0.1:{naive_port}"
        engine = EngineWorker(env, args.model)
        stack.callback(engine.close)
        wait_ready(naive_url, naive)
        client = stack.enter_context(httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=64)))

        server_log.seek(0)
        server_threads = re.search(r"threads: (torch_threads.*)", server_log.read())
        print(f"machine: {available_cores()} cores available to this process (os.sched_getaffinity)")
        print(f"  sequential: {describe({k: v for k, v in engine.report.items() if k not in ('ready', 'placement')})}")
        print(f"  server:     {server_threads.group(1) if server_threads else '(not in its log)'}")
        print(f"  naive:      {describe(client.get(f'{naive_url}/threads').json())}")
        print(f"model: {model_dir}; {args.requests} requests per system and cell, {args.steps} steps, "
              "dpmpp_2m/sgm_uniform, systems interleaved round by round")  # fmt: skip
        print(f"{'size':>5} {'conc':>4} {'system':<11} {'img/s':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7}")

        summary = []
        request_ids = itertools.count()  # the prompt and seed of a request: each used once per system
        for size in args.sizes:

            def body(i: int, size: int = size) -> dict[str, object]:
                return {"prompt": PROMPTS[i % len(PROMPTS)], "width": size, "height": size, "steps": args.steps,
                        "seed": i}  # fmt: skip

            def sequential(i: int, size: int = size) -> None:
                engine.call("generate", prompt=PROMPTS[i % len(PROMPTS)], size=size, steps=args.steps, seed=i)

            def server(i: int) -> None:
                client.post(f"{ours.url}{URL}", json=body(i), headers={"x-api-key": key}).raise_for_status()

            def naive_call(i: int) -> None:
                client.post(f"{naive_url}/generate", json=body(i)).raise_for_status()

            calls = {"sequential": sequential, "server": server, "naive": naive_call}
            warm = next(request_ids)
            for call in calls.values():
                call(warm)  # warm-up at this size
            for c in args.concurrency:
                walls = dict.fromkeys(SYSTEMS, 0.0)
                latencies: dict[str, list[float]] = {name: [] for name in SYSTEMS}
                for r in range(math.ceil(args.requests / c)):
                    ids = [next(request_ids) for _ in range(min(c, args.requests - r * c))]
                    for name in SYSTEMS[r % 3 :] + SYSTEMS[: r % 3]:
                        fns = [functools.partial(calls[name], i) for i in ids]
                        wall, lat = timed_round(fns, 1 if name == "sequential" else c)
                        walls[name] += wall
                        latencies[name] += lat
                row = {}
                for name in SYSTEMS:
                    lat = latencies[name]
                    row[name] = (len(lat) / walls[name], percentile(lat, 0.5), percentile(lat, 0.99), max(lat))
                    print(f"{size:>5} {c:>4} {name:<11} " + " ".join(f"{x:>7.3f}" for x in row[name]), flush=True)
                summary.append((size, c, row))

        print("\nratios (sequential latency is one request's own time: it never queues)")
        print(f"{'size':>5} {'conc':>4} {'server/sequential img/s':>24} {'server/naive img/s':>19} "
              f"{'server/naive p99':>17}")  # fmt: skip
        for size, c, row in summary:
            s, q, n = row["server"], row["sequential"], row["naive"]
            print(f"{size:>5} {c:>4} {s[0] / q[0]:>24.3f} {s[0] / n[0]:>19.3f} {s[2] / n[2]:>17.3f}")

        if args.fairness:
            fairness(client, ours.url, key, size=args.sizes[0], steps=args.steps, requests=args.fairness)

        print("\nbatching gain: a batch of 4 in one pass vs 4 passes (the engine's process)")
        for exact in (True, False):
            label = "exact batches (bit-identical)" if exact else "fast batches (one forward)"
            for size in args.sizes:
                gain = engine.call("batching", size=size, steps=args.steps, exact=exact)["speedup"]
                print(f"  {size}x{size} {label:<30} speed-up {gain:.3f}x")


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
