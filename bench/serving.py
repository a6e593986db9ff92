"""Serving throughput and latency: the engine called sequentially, this server, and a naive server.

    .venv/bin/python bench/serving.py [--sizes 512 1024] [--concurrency 1 4 16] [--requests 16] [--model DIR]

For each size and concurrency: N requests (distinct seeds, a few prompts) through
  (a) the engine called sequentially in this process (pipeline + JPEG), the ideal with no serving at all;
  (b) `sd3serve serve` in another process, c client threads;
  (c) bench/naive_server.py (diffusers' pipeline under a lock) in another process, c client threads.
Prints images/s and p50/p99 latency, and the ratios: server/sequential throughput (target >= 0.95) and
server/naive p99 at the highest concurrency (target <= 1). Then the batching gain: one pass over a batch of 4
against 4 passes, with exact (bit-identical) and fast batches. Systems run one after another in one run; compare
ratios, not absolute times across runs (the machine is shared).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from common import free_port, rich_key, sd3serve, wait_ready
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import demo_model_dir, load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.imaging import ImageFormat, encode_image
from sd3serve.settings import Settings

PROMPTS = ["a red circle on a blue background", "a green square on a white background", "a yellow star"]
BENCH_DIR = Path(__file__).resolve().parent


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run_clients(n: int, concurrency: int, one: Callable[[int], None]) -> tuple[float, list[float]]:
    """(wall seconds, per-request latencies) of n requests from `concurrency` threads."""
    latencies: list[float] = []

    def timed(i: int) -> None:
        t0 = time.perf_counter()
        one(i)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(timed, range(n)))
    return time.perf_counter() - t0, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="sd3serving-"))
    settings = Settings(model=args.model, data_dir=data_dir, device="cpu")
    model_dir = args.model or demo_model_dir()
    model = load_model(settings)
    pipeline = SD3Pipeline(model, exact_batches=settings.exact_batches)

    key = rich_key(data_dir)
    servers = contextlib.ExitStack()
    ours_url = servers.enter_context(sd3serve(data_dir, model_dir, max_queue=1000)).url
    naive_port = free_port()
    naive = subprocess.Popen([sys.executable, str(BENCH_DIR / "naive_server.py"), str(model_dir), str(naive_port)])
    servers.callback(naive.wait, timeout=60)
    servers.callback(naive.terminate)
    naive_url = f"http://127.0.0.1:{naive_port}"
    try:
        wait_ready(naive_url, naive)
        client = httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=64))
        print(f"model: {model.source}; {args.requests} requests per cell, {args.steps} steps, dpmpp_2m/sgm_uniform")
        print(f"{'size':>5} {'conc':>4} {'system':<11} {'img/s':>7} {'p50 s':>7} {'p99 s':>7}")
        summary = []
        for size in args.sizes:

            def job(i: int, size: int = size) -> GenerationJob:
                return GenerationJob(
                    prompt=PROMPTS[i % len(PROMPTS)], negative_prompt="", steps=args.steps, guidance_scale=1.0,
                    seed=i, sampler="dpmpp_2m", scheduler="sgm_uniform", width=size, height=size, batch_size=1,
                )  # fmt: skip

            def engine_call(i: int) -> None:
                encode_image(pipeline(job(i)).images[0], ImageFormat.jpeg, 95)

            def ours_call(i: int, size: int = size) -> None:
                j = job(i)
                body = {"prompt": j.prompt, "width": size, "height": size, "steps": args.steps, "seed": i}
                client.post(f"{ours_url}/v1/stable-diffusion-3.5-turbo-txt2img", json=body,
                            headers={"x-api-key": key}).raise_for_status()  # fmt: skip

            def naive_call(i: int, size: int = size) -> None:
                body = {"prompt": job(i).prompt, "width": size, "height": size, "steps": args.steps, "seed": i}
                client.post(f"{naive_url}/generate", json=body).raise_for_status()

            for warm in (engine_call, ours_call, naive_call):
                warm(0)
            for c in args.concurrency:
                row = {}
                for name, fn, conc in (("sequential", engine_call, 1), ("server", ours_call, c),
                                       ("naive", naive_call, c)):  # fmt: skip
                    wall, lat = run_clients(args.requests, conc, fn)
                    row[name] = (args.requests / wall, statistics.median(lat), percentile(lat, 0.99))
                    ips, p50, p99 = row[name]
                    print(f"{size:>5} {c:>4} {name:<11} {ips:>7.3f} {p50:>7.2f} {p99:>7.2f}", flush=True)
                summary.append((size, c, row))
        print("\nratios")
        print(f"{'size':>5} {'conc':>4} {'server/sequential img/s':>24} {'server/naive p99':>17}")
        for size, c, row in summary:
            print(f"{size:>5} {c:>4} {row['server'][0] / row['sequential'][0]:>24.3f} "
                  f"{row['server'][2] / row['naive'][2]:>17.3f}")  # fmt: skip

        print("\nbatching gain: a batch of 4 in one pass vs 4 passes (engine, in process)")
        for exact in (True, False):
            pipe = SD3Pipeline(model, exact_batches=exact)
            for size in args.sizes:
                jobs = [GenerationJob(prompt=PROMPTS[0], negative_prompt="", steps=args.steps, guidance_scale=1.0,
                                      seed=i, sampler="dpmpp_2m", scheduler="sgm_uniform", width=size,
                                      height=size, batch_size=1) for i in range(4)]  # fmt: skip
                pipe.generate_many(jobs[:1])  # warm
                ratios = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for j in jobs:
                        pipe.generate_many([j])
                    separate = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    pipe.generate_many(jobs)
                    ratios.append(separate / (time.perf_counter() - t0))
                label = "exact batches (bit-identical)" if exact else "fast batches (one forward)"
                print(f"  {size}x{size} {label:<30} speed-up {statistics.median(ratios):.3f}x")
    finally:
        servers.close()


if __name__ == "__main__":
    main()
