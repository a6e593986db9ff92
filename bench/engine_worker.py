"""The engine (pipeline + JPEG) in a process of its own, driven by JSON lines on stdin; answers on stdout.

    python bench/engine_worker.py [--model DIR] [--placement thread|main|second]

Started by bench/common.py's `EngineWorker`, with the thread environment the benchmark chose: this script sets
torch's thread count (SD3SERVE_THREADS, as the server does) but leaves OMP_WAIT_POLICY as it finds it.
Placement decides which thread runs torch:
  thread: one dedicated thread loads the model and runs every request, as the server's engine thread does;
  main:   the main thread does everything;
  second: the main thread loads and warms up, a second thread runs the requests (two OpenMP pools, as
          bench/serving.py had it before).
Requests: {"op": "generate", "prompt", "size", "steps", "seed"} -> {"wall", "cpu", "switches"} (seconds, process
CPU seconds, context switches of the torch thread); {"op": "batching", "size", "steps", "exact"} -> {"speedup"}.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from sd3serve import allocator
from sd3serve.settings import Settings
from sd3serve.threads import set_thread_counts, thread_report

T = TypeVar("T")
PROMPT = "a red circle on a blue background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--placement", choices=["thread", "main", "second"], default="thread")
    args = ap.parse_args()
    environment = Settings()
    allocator.tune_at_start(environment.malloc_tuning, "cpu")  # first, as `sd3serve serve` does (before any thread)
    set_thread_counts(environment)  # OMP_WAIT_POLICY: as the environment has it, unlike the server's default

    import copy

    from sd3serve.engine.job import GenerationJob
    from sd3serve.engine.pipeline import build_pipeline
    from sd3serve.imaging import ImageFormat, encode_image

    executor = ThreadPoolExecutor(max_workers=1)

    def on_thread(fn: Callable[[], T]) -> T:
        return executor.submit(fn).result()

    def on_main(fn: Callable[[], T]) -> T:
        return fn()

    load = on_thread if args.placement == "thread" else on_main
    work = on_main if args.placement == "main" else on_thread

    def job(prompt: str, size: int, steps: int, seed: int) -> Any:
        return GenerationJob(
            prompt=prompt, negative_prompt="", steps=steps, guidance_scale=1.0, seed=seed, sampler="dpmpp_2m",
            scheduler="sgm_uniform", width=size, height=size, batch_size=1,
        )  # fmt: skip

    settings = Settings(model=args.model, device="cpu", exact_batches=True)
    exact = load(lambda: build_pipeline(settings))  # the engine's pipeline as the server builds it
    fast = copy.copy(exact)  # the same model and settings, batches in one forward pass
    fast.exact_batches = False
    pipelines = {True: exact, False: fast}
    load(lambda: pipelines[True](job(PROMPT, 256, 1, 0)))  # warm-up, as the server's engine does

    def generate(req: dict[str, Any]) -> dict[str, float]:
        t0, cpu0, th0 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_THREAD)
        image = pipelines[True](job(req["prompt"], req["size"], req["steps"], req["seed"])).images[0]
        encode_image(image, ImageFormat.jpeg, 95)
        th1 = resource.getrusage(resource.RUSAGE_THREAD)
        switches = th1.ru_nvcsw + th1.ru_nivcsw - th0.ru_nvcsw - th0.ru_nivcsw
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0, "switches": switches}

    def batching(req: dict[str, Any]) -> dict[str, float]:
        """One pass over a batch of 4 against 4 passes: median speed-up of 3 tries."""
        pipe = pipelines[req["exact"]]
        jobs = [job(PROMPT, req["size"], req["steps"], seed) for seed in range(4)]
        pipe.generate_many(jobs[:1])
        ratios = []
        for _ in range(3):
            t0 = time.perf_counter()
            for j in jobs:
                pipe.generate_many([j])
            separate = time.perf_counter() - t0
            t0 = time.perf_counter()
            pipe.generate_many(jobs)
            ratios.append(separate / (time.perf_counter() - t0))
        return {"speedup": statistics.median(ratios)}

    ops: dict[str, Callable[[dict[str, Any]], dict[str, float]]] = {"generate": generate, "batching": batching}
    print(json.dumps({"ready": True, "placement": args.placement, **work(thread_report)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        print(json.dumps(work(lambda req=req: ops[req["op"]](req))), flush=True)


if __name__ == "__main__":
    main()
