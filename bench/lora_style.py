"""How often the demo judge sees the demo adapter's style (striped backgrounds) with and without the adapter.

    OMP_NUM_THREADS=1 PYTHONPATH=tools .venv/bin/python bench/lora_style.py --prompts 50 --size 256

Prompts are held-out scenes of the demo world (``world.held_out_scenes``, triples never trained on); each is
generated twice with the same seed, with and without the adapter, on the engine exactly as the server builds it.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from sd3demo.judge import judge, striped
from sd3demo.world import held_out_scenes
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.lora_names import DEMO_LORA_DIR
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.settings import Settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=50)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--adapter", default="striped")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--prompt-seed", type=int, default=2026)
    p.add_argument("--lora-dir", type=Path, default=DEMO_LORA_DIR)
    a = p.parse_args()
    pipe = build_pipeline(Settings(device="cpu", lora_dir=a.lora_dir))
    with_hits = without_hits = shape_ok = 0
    t0 = time.perf_counter()
    scenes = held_out_scenes(a.prompts, seed=a.prompt_seed)
    for i, scene in enumerate(scenes):
        job = GenerationJob(
            prompt=scene.caption(),
            negative_prompt="",
            steps=a.steps,
            guidance_scale=1.0,
            seed=i,
            sampler="dpmpp_2m",
            scheduler="sgm_uniform",
            width=a.size,
            height=a.size,
            batch_size=1,
        )
        plain = pipe(job).images[0]
        styled = pipe(dataclasses.replace(job, loras=((a.adapter, a.scale),))).images[0]
        without_hits += striped(plain)
        with_hits += striped(styled)
        v = judge(plain)
        shape_ok += (v.colour, v.shape) == (scene.colour, scene.shape)
    n = len(scenes)
    print(f"{n} held-out prompts (seed {a.prompt_seed}), {a.size}², {a.steps} steps, adapter {a.adapter}:{a.scale}")
    print(f"striped background detected: with the adapter {with_hits}/{n} = {100 * with_hits / n:.0f} %, "
          f"without {without_hits}/{n} = {100 * without_hits / n:.0f} %")  # fmt: skip
    print(f"(without: colour and shape right {shape_ok}/{n}); {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
