"""The demo VAE's decode with each CPU option, side by side, interleaved, and the pixels each option changes.

    .venv/bin/python bench/vae_decode.py [--size 1024] [--rounds 9] [--model DIR]

Variants, each a pipeline built as the server builds it (`build_pipeline`, the process configured by
`configure_threads` as `sd3serve serve` is), differing only in the VAE options:
  plain:            diffusers' decoder as it is (the pixels every other variant is compared with);
  channels-last:    SD3SERVE_CHANNELS_LAST_VAE;
  + subpixel:       and SD3SERVE_VAE_SUBPIXEL (upsamplers as transposed convolutions, engine/subpixel.py);
  + in-place:       and SD3SERVE_VAE_INPLACE (resnet blocks without the extra passes, engine/vae_inplace.py):
                    the CPU default.
One latent from a real generation at --size is decoded to a picture (`SD3Pipeline.decode`, on the decode's
threads), each round running every variant once, in an order that rotates. Prints the median seconds per decode,
the ratios of the medians to plain and to channels-last, the median of the round-by-round ratios to the variant
above (paired: steadier on a noisy machine), and the largest difference in 8-bit levels from plain's pixels (the
ComfyUI-parity tolerance is 2) with the share of values that differ.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from sd3serve.settings import Settings
from sd3serve.threads import configure_threads, describe, thread_report

VARIANTS = {
    "plain": {"channels_last_vae": "off", "vae_subpixel": "off", "vae_inplace": "off"},
    "channels-last": {"channels_last_vae": "on", "vae_subpixel": "off", "vae_inplace": "off"},
    "+ subpixel": {"channels_last_vae": "on", "vae_subpixel": "on", "vae_inplace": "off"},
    "+ in-place": {"channels_last_vae": "on", "vae_subpixel": "on", "vae_inplace": "on"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--model", type=Path, default=None, help="default: the embedded demo model")
    args = ap.parse_args()
    configure_threads(Settings(model=args.model))  # as `sd3serve serve` does, before anything imports torch
    import torch

    from sd3serve.engine.job import GenerationJob
    from sd3serve.engine.pipeline import SD3Pipeline, build_pipeline
    from sd3serve.threads import torch_threads

    pipes = {name: build_pipeline(Settings(model=args.model, device="cpu", **opts)) for name, opts in VARIANTS.items()}
    assert Settings().vae_inplace == Settings().vae_subpixel == Settings().channels_last_vae == "auto"

    latents: list[torch.Tensor] = []
    default = pipes["+ in-place"]
    real_decode = default.decode

    def capture(z: torch.Tensor) -> list[Any]:
        latents.append(z.clone())
        return real_decode(z)

    default.decode = capture  # type: ignore[method-assign]
    job = GenerationJob(
        prompt="a red circle at the top on a blue background", negative_prompt="", steps=4, guidance_scale=1.0,
        seed=7, sampler="dpmpp_2m", scheduler="sgm_uniform", width=args.size, height=args.size, batch_size=1,
    )  # fmt: skip
    default(job)
    default.decode = real_decode  # type: ignore[method-assign]
    z = latents[0]

    def decode(pipe: SD3Pipeline) -> np.ndarray:
        with torch.no_grad(), torch_threads(pipe.decode_threads()):
            return np.asarray(pipe.decode(z)[0]).astype(int)

    pixels = {name: decode(pipe) for name, pipe in pipes.items()}  # also warms each up
    times: dict[str, list[float]] = {name: [] for name in pipes}
    names = list(pipes)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            decode(pipes[name])
            times[name].append(time.perf_counter() - t0)

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"this process: {describe(thread_report())}; decode threads {default.decode_threads()}; load average {load}")
    print(f"VAE decode of one {args.size}x{args.size} latent to a picture; {args.rounds} rounds, interleaved")
    print(f"{'variant':<14} {'median s':>9} {'min s':>7} {'/plain':>7} {'/chan-last':>10} {'/previous':>10} "
          f"{'max diff':>9} {'values differing':>17}")  # fmt: skip
    med = {name: statistics.median(t) for name, t in times.items()}
    for k, name in enumerate(names):
        diff = np.abs(pixels[name] - pixels["plain"])
        # the median of the round-by-round ratios to the variant above: each pair ran in the same round
        paired = statistics.median(a / b for a, b in zip(times[name], times[names[k - 1]], strict=True)) if k else 1
        print(f"{name:<14} {med[name]:>9.3f} {min(times[name]):>7.3f} {med[name] / med['plain']:>7.3f} "
              f"{med[name] / med['channels-last']:>10.3f} {paired:>10.3f} {diff.max():>9d} "
              f"{(diff > 0).mean():>16.2%}")  # fmt: skip
    same = np.array_equal(pixels["+ in-place"], pixels["+ subpixel"])
    print(f"in-place blocks give the same pixels as diffusers' blocks: {same}")


if __name__ == "__main__":
    main()
