"""What live previews cost the engine: a generation with a preview watched against the same without, and the
preview's own parts (latent→RGB on an SD3.5-sized latent, the host copy, the JPEG) on their own.

    OMP_NUM_THREADS=1 .venv/bin/python bench/previews.py --size 1024 --steps 8 --repeats 5

The generations run on the embedded demo model, alternating with and without a watcher so that drift in the
machine's load hits both alike; the median of each is printed, in CPU seconds of this process (on a shared
machine its wall time mostly measures the neighbours). The parts are timed on the CPU for a 1024² SD3.5
latent (16 x 128 x 128), whatever the model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sd3serve.engine.job import GenerationJob
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.engine.previews import SD3, PreviewHook
from sd3serve.service.progress import Preview
from sd3serve.settings import Settings


def timed(fn: object, repeats: int, clock: object = time.perf_counter) -> float:
    """The median seconds of ``fn()`` over ``repeats`` calls, by ``clock``."""
    runs = []
    for _ in range(repeats):
        start = clock()  # type: ignore[operator]
        fn()  # type: ignore[operator]
        runs.append(clock() - start)  # type: ignore[operator]
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    pipe = build_pipeline(Settings.model_validate({"device": "cpu"}))
    job = GenerationJob(prompt="a red circle on a blue background", negative_prompt="", steps=args.steps,
                        guidance_scale=1.0, seed=0, sampler="dpmpp_2m", scheduler="sgm_uniform", width=args.size,
                        height=args.size, batch_size=1)  # fmt: skip
    got: list[np.ndarray] = []
    hook = PreviewHook(rows=lambda: [0], put=lambda row, step, steps, rgb: got.append(rgb))
    pipe(job)  # warm up
    plain, watched = [], []
    for _ in range(args.repeats):
        plain.append(timed(lambda: pipe(job), 1, time.process_time))
        watched.append(timed(lambda: pipe(job, previews=hook), 1, time.process_time))
    p, w = statistics.median(plain), statistics.median(watched)
    print(f"demo model {args.size}², {args.steps} steps: {p:.3f} CPU s without a watcher, {w:.3f} with one "
          f"({(w - p) / p * 100:+.1f} %), {len(got) // args.repeats} previews a run of {got[-1].shape[1]}x"
          f"{got[-1].shape[0]}")  # fmt: skip

    x0 = torch.randn(1, 16, 128, 128)
    rgb = SD3.pixels(x0)[0]
    to_rgb = timed(lambda: SD3.pixels(x0), 50)
    to_host = timed(lambda: rgb.permute(1, 2, 0).cpu().numpy(), 50)
    array = rgb.permute(1, 2, 0).numpy()
    jpeg = timed(lambda: Preview(step=1, steps=1, rgb=array).data(), 50)
    size = len(Preview(step=1, steps=1, rgb=array).data()["image"])
    print(f"SD3.5 1024² latent: latent->RGB {to_rgb * 1e3:.2f} ms, host copy {to_host * 1e3:.3f} ms, "
          f"JPEG + base64 {jpeg * 1e3:.2f} ms ({size} base64 characters)")


if __name__ == "__main__":
    main()
