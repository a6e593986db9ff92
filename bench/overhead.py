"""HTTP overhead and the demo's one-request time: the same request through the engine directly and through the
server, interleaved.

    .venv/bin/python bench/overhead.py [--runs 10] [--size 1024] [--steps 4] [--model PATH] [--target 0.8]

"engine" is the engine's pipeline alone and "direct" the pipeline plus JPEG encoding, both in this process,
built and configured as `sd3serve serve` builds them (`configure_threads` before torch is imported: the
OMP_WAIT_POLICY and thread counts of the server; the pipeline loaded and run on one dedicated thread, as the
server's engine thread does); "http" is POST /v1/stable-diffusion-3.5-turbo-txt2img to `sd3serve serve` in another
process (same model, same request), end to end with auth, credits and the response. Runs alternate so that
machine noise hits both alike. Prints the medians (the demo's 1024², 4-step, one-request target: engine and
HTTP times <= --target seconds on a quiet machine) and the median of the per-pair ratios http / direct.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import httpx

from common import URL, rich_key, sd3serve
from sd3serve.api.schemas import parse_txt2img
from sd3serve.imaging import encode_image
from sd3serve.settings import Settings
from sd3serve.threads import configure_threads, describe, thread_report

T = TypeVar("T")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    ap.add_argument("--target", type=float, default=0.8, help="seconds for one request (the demo at 1024²)")
    args = ap.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="sd3bench-"))
    settings = Settings(model=args.model, data_dir=data_dir, device="cpu")
    configure_threads(settings)  # as `sd3serve serve` does, before anything imports torch
    from sd3serve.engine.pipeline import build_pipeline

    body = {
        "prompt": "a red circle on a blue background",
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": 1234,
    }
    req = parse_txt2img(body)
    engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sd3-engine")

    def on_engine(fn: Callable[[], T]) -> T:
        return engine_thread.submit(fn).result()

    pipeline = on_engine(lambda: build_pipeline(settings))  # the engine's pipeline as the server builds it

    key = rich_key(data_dir)
    server_env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # the server sets its own
    with (
        sd3serve(data_dir, args.model, env=server_env) as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        engine_times: list[float] = []

        def direct() -> bytes:
            t0 = time.perf_counter()
            result = on_engine(lambda: pipeline(req.to_job()))
            engine_times.append(time.perf_counter() - t0)
            return encode_image(result.images[0], req.image_format, req.image_quality)

        def http() -> bytes:
            r = client.post(URL, json=body, headers={"x-api-key": key})
            r.raise_for_status()
            return r.content

        assert direct() == http(), "the server and the engine should give the same bytes"  # also warms up
        engine_times.clear()
        ratios, t_direct, t_http = [], [], []
        for i in range(args.runs):
            order = (direct, http) if i % 2 == 0 else (http, direct)
            times = {}
            for fn in order:
                t0 = time.perf_counter()
                fn()
                times[fn.__name__] = time.perf_counter() - t0
            t_direct.append(times["direct"])
            t_http.append(times["http"])
            ratios.append(times["http"] / times["direct"])
        engine, direct_s, http_s = (statistics.median(t) for t in (engine_times, t_direct, t_http))
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"this process: {describe(thread_report())}; load average {load}")
        print(
            f"request: {args.size}x{args.size}, {args.steps} steps, dpmpp_2m/sgm_uniform, jpeg q95; {args.runs} pairs"
        )
        print(f"engine (pipeline)      median {engine:.3f} s  (min {min(engine_times):.3f})")
        print(f"direct (engine + JPEG) median {direct_s:.3f} s  (min {min(t_direct):.3f})")
        print(f"http (end to end)      median {http_s:.3f} s  (min {min(t_http):.3f})")
        for name, t in (("engine", engine), ("http", http_s)):
            print(f"one request, {name}: {t:.3f} s against the target <= {args.target} s: "
                  f"{'met' if t <= args.target else 'NOT met'}")  # fmt: skip
        print(f"median ratio http/direct: {statistics.median(ratios):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
