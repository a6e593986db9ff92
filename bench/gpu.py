"""This server's engine against diffusers' StableDiffusion3Pipeline on the SD3.5 Large architecture.

    python bench/gpu.py                      # CUDA, full size (random weights, bf16): the figures that matter
    python bench/gpu.py --device cpu --reduced --size 256 --runs 2    # a smoke run of the same code on a CPU

Whole requests (text encoding, 4 steps, decoding, JPEG), 1024², guidance 1, batch 1 and 4, in one run on one
device: seconds per image, images/s, peak GPU memory and the ratios; each speed option on its own, then all
together; the memory modes with their peak memory; and the fraction of the hardware limit reached, from the
transformer's matmul FLOPs (bench/sd35_large.py) and the device's peak bf16 rate (--peak-tflops, default 989
for an H100 SXM).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd3serve.engine.acceleration import apply_acceleration
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings
from sd35_large import build_pipeline, transformer_flops

PROMPT = "a panda in a glowing tech-infused jacket in front of a cyberpunk market"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str, runs: int) -> tuple[float, float]:
    """(median seconds, peak memory in GiB) over `runs` calls after one warm-up call."""
    fn()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return statistics.median(times), peak


def jpeg(image: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)  # type: ignore[attr-defined]
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reduced", action="store_true", help="small widths and depths (CPU smoke run)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    pipe = build_pipeline(reduced=args.reduced, dtype=dtype, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(pipe=pipe, flow=FlowSampling(shift=3.0), device=torch.device(args.device), dtype=dtype,
                        source="SD3.5 Large architecture, random weights")  # fmt: skip
    size, steps = args.size, args.steps

    def job(batch: int) -> GenerationJob:
        return GenerationJob(
            prompt=PROMPT, negative_prompt="", steps=steps, guidance_scale=1.0, seed=0, sampler="euler",
            scheduler="simple", width=size, height=size, batch_size=batch,
        )  # fmt: skip

    def diffusers_request(batch: int) -> None:
        images = pipe(PROMPT, num_inference_steps=steps, guidance_scale=1.0, height=size, width=size,
                      num_images_per_prompt=batch, generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        [jpeg(im) for im in images]

    def ours(engine: SD3Pipeline, batch: int) -> Callable[[], None]:
        return lambda: [jpeg(im) for im in engine.generate_many([job(batch)])[0].images]  # type: ignore[func-returns-value]

    rows: list[tuple[str, int, float, float]] = []
    print(f"device {args.device}{' (reduced architecture)' if args.reduced else ''}, {size}², {steps} steps, "
          f"{dtype}, whole request incl. JPEG")  # fmt: skip
    for batch in (1, 4):
        t, mem = timed(lambda b=batch: diffusers_request(b), args.device, args.runs)
        rows.append(("diffusers default", batch, t, mem))
    variants: list[tuple[str, dict[str, str]]] = [
        ("ours: plain", {}),
        ("ours: + fused QKV", {"fuse_qkv": "on"}),
        ("ours: + channels-last VAE", {"channels_last_vae": "on"}),
        ("ours: + compile (regional)", {"compile": "regional"}),
    ]
    for name, options in variants:  # cumulative: each row adds one option to the row above
        if options:
            only = {"device": args.device, "fuse_qkv": "off", "channels_last_vae": "off", **options}
            apply_acceleration(model, Settings(**only))
        engine = SD3Pipeline(model, exact_batches=False, prompt_cache_bytes=0, vae_tiling="off")
        for batch in (1, 4):
            t, mem = timed(ours(engine, batch), args.device, args.runs)
            rows.append((name, batch, t, mem))
    base = {b: t for n, b, t, _ in rows if n == "diffusers default"}
    print(f"{'engine':<30} {'batch':>5} {'s/image':>8} {'img/s':>7} {'peak GiB':>9} {'vs diffusers':>13}")
    for name, batch, t, mem in rows:
        print(f"{name:<30} {batch:>5} {t / batch:>8.3f} {batch / t:>7.2f} {mem:>9.2f} {base[batch] / t:>12.2f}x")
    flops = transformer_flops(size, size) * steps
    best = min(t for n, b, t, _ in rows if b == 1 and n.startswith("ours"))
    limit_s = flops / (args.peak_tflops * 1e12)
    print(f"hardware limit: {flops / 1e12:.0f} TFLOP of transformer matmuls per request at {args.peak_tflops:g} "
          f"TFLOP/s = {limit_s * 1000:.0f} ms; best whole request {best * 1000:.0f} ms = {100 * limit_s / best:.0f}% "
          "of the limit" + (" (full-size FLOPs; the reduced model is smaller)" if args.reduced else ""))  # fmt: skip
    if args.device == "cuda":
        memory_modes(args)


def memory_modes(args: argparse.Namespace) -> None:
    """Peak GPU memory of one 1024² request (2048² for tiling) in each memory mode, each on a fresh model."""
    print(f"{'memory mode':<28} {'s/image':>8} {'peak GiB':>9}")
    modes: list[tuple[str, dict[str, str], bool, int]] = [
        ("bf16, all on the GPU", {}, True, args.size),
        ("no T5", {}, False, args.size),
        ("model CPU offload", {"offload": "model"}, True, args.size),
        ("sequential CPU offload", {"offload": "sequential"}, True, args.size),
        ("VAE tiling, 2048²", {"vae_tiling": "on"}, True, 2048),
    ]
    for name, options, with_t5, size in modes:
        torch.cuda.empty_cache()
        offload = "offload" in options
        pipe = build_pipeline(reduced=args.reduced, dtype=torch.bfloat16, device="cpu" if offload else "cuda",
                              with_t5=with_t5)  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        model = LoadedModel(pipe=pipe, flow=FlowSampling(shift=3.0), device=torch.device("cuda"),
                            dtype=torch.bfloat16, source="random")  # fmt: skip
        only = {"device": "cuda", "fuse_qkv": "off", "channels_last_vae": "off", **options}
        apply_acceleration(model, Settings(**only))
        engine = SD3Pipeline(model, exact_batches=False, vae_tiling=options.get("vae_tiling", "off"))  # type: ignore[arg-type]
        one = GenerationJob(prompt=PROMPT, negative_prompt="", steps=args.steps, guidance_scale=1.0, seed=0,
                            sampler="euler", scheduler="simple", width=size, height=size, batch_size=1)  # fmt: skip
        t, mem = timed(lambda e=engine, j=one: e(j), "cuda", max(1, args.runs // 2))
        print(f"{name:<28} {t:>8.3f} {mem:>9.2f}")
        del pipe, model, engine


if __name__ == "__main__":
    main()
