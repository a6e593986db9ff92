"""This server's engine against diffusers' StableDiffusion3Pipeline on the SD3.5 Large architecture.

    python bench/gpu.py                      # CUDA, full size (random weights, bf16): the figures that matter
    python bench/gpu.py --device cpu --reduced --size 256 --runs 2    # a smoke run of the same code on a CPU

Whole requests (text encoding, 4 steps, decoding, JPEG), 1024², guidance 1, batch 1 and 4, in one run on one
device: seconds per image, images/s, peak GPU memory and the ratios; each speed option on its own, then all
together; the warm-up call (compilation included) is timed and printed apart. First, on an empty GPU, each memory
mode of engine/memory.py on a fresh pipeline: its latency and real peak (torch.cuda.max_memory_allocated) against
the plan's. Last, the fraction of the hardware limit reached, from the transformer's matmul FLOPs
(bench/sd35_large.py) and the device's peak bf16 rate (--peak-tflops, default 989 for an H100 SXM), over the whole
request (a lower bound: encoding, decoding and JPEG count as time without transformer FLOPs) and over the denoising
phase alone.
"""

from __future__ import annotations

import argparse
import gc
import io
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd3serve.engine.acceleration import apply_acceleration, prepare_weights
from sd3serve.engine.flow import FlowSampling
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import LoadedModel, parse_device
from sd3serve.engine.memory import MODES, GiB, memory_plan
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.settings import Settings
from sd35_large import build_pipeline, transformer_flops, write_configs

PROMPT = "a panda in a glowing tech-infused jacket in front of a cyberpunk market"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP: dict[str, float] = {}  # first-call seconds (compilation included), by row name


def timed(fn: Callable[[], object], device: torch.device, runs: int, name: str = "") -> tuple[float, float]:
    """(median seconds, peak memory in GiB) over `runs` calls after one warm-up call, whose time is kept apart."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    WARMUP[name] = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def jpeg(image: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)  # type: ignore[attr-defined]
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N")
    ap.add_argument("--reduced", action="store_true", help="small widths and depths (CPU smoke run)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--modes", default="all", help="memory modes to measure, comma-separated, or all, or none")
    args = ap.parse_args()
    device = parse_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda and args.modes != "none":
        memory_modes(args, device)  # first, on an empty GPU: each mode's peak is its own
    pipe = build_pipeline(reduced=args.reduced, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    model = LoadedModel(pipe=pipe, flow=FlowSampling(shift=3.0), device=device, dtype=dtype,
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

    denoise: dict[str, list[float]] = {}

    def ours(engine: SD3Pipeline, batch: int, name: str) -> Callable[[], None]:
        def run() -> None:
            result = engine.generate_many([job(batch)])[0]
            denoise.setdefault(f"{name}/{batch}", []).append(float(result.timings["denoise"]))
            [jpeg(im) for im in result.images]

        return run

    rows: list[tuple[str, int, float, float]] = []
    print(f"device {device}{' (reduced architecture)' if args.reduced else ''}, {size}², {steps} steps, "
          f"{dtype}, whole request incl. JPEG")  # fmt: skip
    for batch in (1, 4):
        t, mem = timed(lambda b=batch: diffusers_request(b), device, args.runs, f"diffusers default/{batch}")
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
            t, mem = timed(ours(engine, batch, name), device, args.runs, f"{name}/{batch}")
            rows.append((name, batch, t, mem))
    base = {b: t for n, b, t, _ in rows if n == "diffusers default"}
    print(f"{'engine':<30} {'batch':>5} {'s/image':>8} {'img/s':>7} {'peak GiB':>9} {'vs diffusers':>13} "
          f"{'first call s':>13}")  # fmt: skip
    for name, batch, t, mem in rows:
        print(f"{name:<30} {batch:>5} {t / batch:>8.3f} {batch / t:>7.2f} {mem:>9.2f} {base[batch] / t:>12.2f}x "
              f"{WARMUP[f'{name}/{batch}']:>13.2f}")  # fmt: skip
    flops = transformer_flops(size, size) * steps
    best_name, best = min(((n, t) for n, b, t, _ in rows if b == 1 and n.startswith("ours")), key=lambda r: r[1])
    best_denoise = statistics.median(denoise[f"{best_name}/1"][1:])  # without the warm-up call
    limit_s = flops / (args.peak_tflops * 1e12)
    print(f"hardware limit: {flops / 1e12:.0f} TFLOP of transformer matmuls per request at {args.peak_tflops:g} "
          f"TFLOP/s = {limit_s * 1000:.0f} ms. Best whole request ({best_name}) {best * 1000:.0f} ms = "
          f"{100 * limit_s / best:.0f}% of the limit (a lower bound: the request also encodes, decodes and writes "
          f"JPEG); its denoising phase alone {best_denoise * 1000:.0f} ms = {100 * limit_s / best_denoise:.0f}%"
          + (" (full-size FLOPs; the reduced model is smaller)" if args.reduced else ""))  # fmt: skip


def memory_modes(args: argparse.Namespace, device: torch.device) -> None:
    """Each memory mode on a fresh pipeline, the GPU otherwise empty: latency and real peak of a 1024² request
    (torch.cuda.max_memory_allocated) against the plan's peak (engine/memory.py) for the same architecture."""
    with tempfile.TemporaryDirectory() as tmp:
        plan = memory_plan(write_configs(Path(tmp), reduced=args.reduced), prompt_cache_bytes=0)
    wanted = None if args.modes == "all" else set(args.modes.split(","))
    print(f"{'memory mode':<22} {'s/image':>8} {'first s':>8} {'peak GiB':>9} {'plan GiB':>9} {'weights GiB':>12}")
    for mode in MODES:
        if wanted is not None and mode.name not in wanted:
            continue
        gc.collect()
        torch.cuda.empty_cache()
        offload = mode.offload != "none"
        pipe = build_pipeline(reduced=args.reduced, dtype=torch.bfloat16, device="cpu" if offload else device,
                              with_t5=mode.t5 != "off")  # fmt: skip
        pipe.set_progress_bar_config(disable=True)
        prepare_weights(pipe, fuse=True, fp8_transformer=mode.transformer == "fp8", fp8_t5=mode.t5 == "fp8",
                        compute_dtype=torch.bfloat16)  # fmt: skip
        model = LoadedModel(pipe=pipe, flow=FlowSampling(shift=3.0), device=device, dtype=torch.bfloat16,
                            source="random", memory=mode)  # fmt: skip
        apply_acceleration(model, Settings(device=args.device, channels_last_vae="on"))
        engine = SD3Pipeline(model, exact_batches=True, prompt_cache_bytes=0, vae_tiling="auto")
        one = GenerationJob(prompt=PROMPT, negative_prompt="", steps=args.steps, guidance_scale=1.0, seed=0,
                            sampler="euler", scheduler="simple", width=1024, height=1024, batch_size=1)  # fmt: skip
        t, mem = timed(lambda e=engine, j=one: e(j), device, max(1, args.runs // 2), mode.name)
        print(f"{mode.name:<22} {t:>8.3f} {WARMUP[mode.name]:>8.2f} {mem:>9.2f} "
              f"{plan.peak(mode, 1024, 1) / GiB:>9.2f} {plan.weights(mode) / GiB:>12.2f}")  # fmt: skip
        del pipe, model, engine


if __name__ == "__main__":
    main()
