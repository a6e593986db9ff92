"""Quality and speed of the embedded demo model on held-out prompts, judged by plain image analysis.

    .venv/bin/python bench/demo_quality.py [--n 100] [--model DIR] [--configs default,512,euler,8steps]
        [--prompt-seeds 2026,0] [--save-examples DIR] [--figure docs/demo/held-out-1024-4steps.jpg]

Every prompt combines a (colour, shape, background) triple never seen in training with a random position and
size (``world.held_out_scenes(n, seed)``). Two sets of prompts by default, reported side by side: seed 0, the set
that chose between versions of the model (so its figures are optimistic), and seed 2026, a fresh set that no
decision has looked at. Each configuration generates one image per prompt (seed ``1_000_000 · prompt seed + prompt
index``: 0, 1, 2, ... for the seed-0 set, as before) through the server's own pipeline and prints, per attribute
and set, the share of images the judge (``tools/sd3demo/judge.py``) reads as the prompt says, then the time per
image split into text encoding, denoising, decoding and JPEG encoding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the demo model's tooling: sd3demo
from sd3demo import world
from sd3demo.judge import judge
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import load_model
from sd3serve.engine.pipeline import SD3Pipeline
from sd3serve.imaging import ImageFormat, encode_image
from sd3serve.settings import Settings

DEMO_DIR = Path(__file__).resolve().parents[1] / "src" / "sd3serve" / "models" / "demo"
ATTRIBUTES = ("background", "colour", "shape", "position", "size")
# Held-out prompt sets that decided something (which model version ships): their figures are not held out from
# the choices made on them.
DECISION_SEEDS = {0: "chose between model versions"}
# name -> (size, steps, sampler, scheduler)
CONFIGS: dict[str, tuple[int, int, str, str]] = {
    "default": (1024, 4, "dpmpp_2m", "sgm_uniform"),
    "512": (512, 4, "dpmpp_2m", "sgm_uniform"),
    "euler": (1024, 4, "euler", "simple"),
    "euler512": (512, 4, "euler", "simple"),
    "8steps": (1024, 8, "dpmpp_2m", "sgm_uniform"),
    "8steps512": (512, 8, "dpmpp_2m", "sgm_uniform"),
}


FIGURE_COLUMNS = 6


def write_figure(path: Path, scenes: list[world.Scene], images: list[Image.Image]) -> None:
    """Ground truth (top row) against the model (bottom row), 256 px a picture, captions underneath."""
    n, side = len(images), 256
    fig = Image.new("RGB", (n * side, 2 * side + 40), "white")
    draw = ImageDraw.Draw(fig)
    for i, (scene, image) in enumerate(zip(scenes, images, strict=True)):
        fig.paste(world.render(scene, side), (i * side, 0))
        fig.paste(image.convert("RGB").resize((side, side), Image.Resampling.BOX), (i * side, side))
        words = scene.caption().split(" on ")
        for j, line in enumerate([words[0], "on " + words[1]] if len(words) == 2 else words):
            draw.text((i * side + 4, 2 * side + 4 + 16 * j), line, fill="black")
    fig.save(path, quality=90)


def set_label(seed: int) -> str:
    return f"seed {seed} ({DECISION_SEEDS.get(seed, 'fresh')})"


def run_config(
    pipe: SD3Pipeline, name: str, prompt_sets: dict[int, list[world.Scene]], save: Path | None,
    figure: Path | None = None,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Every prompt of every set at one configuration; returns each set's share of hits per attribute."""
    size, steps, sampler, scheduler = CONFIGS[name]
    timings: dict[str, list[float]] = {"encode": [], "denoise": [], "decode": [], "jpeg": [], "total": []}
    rows: list[str] = []
    shares: dict[int, dict[str, float]] = {}
    for k, (prompt_seed, scenes) in enumerate(prompt_sets.items()):
        hits = dict.fromkeys(ATTRIBUTES, 0)
        all_four = 0
        shown: list[Image.Image] = []
        for i, scene in enumerate(scenes):
            job = GenerationJob(
                prompt=scene.caption(),
                negative_prompt="",
                steps=steps,
                guidance_scale=1.0,
                seed=1_000_000 * prompt_seed + i,
                sampler=sampler,
                scheduler=scheduler,
                width=size,
                height=size,
                batch_size=1,
            )
            t0 = time.perf_counter()
            result = pipe(job)
            t1 = time.perf_counter()
            encode_image(result.images[0], ImageFormat.jpeg, 95)
            t2 = time.perf_counter()
            for key in ("encode", "denoise", "decode"):
                timings[key].append(result.timings[key])
            timings["jpeg"].append(t2 - t1)
            timings["total"].append(t2 - t0)
            verdict = judge(result.images[0])
            matches = verdict.matches(scene)
            for attr, ok in matches.items():
                hits[attr] += ok
            all_four += all(matches[a] for a in ("background", "colour", "shape", "position"))
            if save is not None and i < 4:
                result.images[0].save(save / f"{name}-seed{prompt_seed}-{i:02d}.jpg", quality=90)
            if figure is not None and k == 0 and i < FIGURE_COLUMNS:
                shown.append(result.images[0])
        if figure is not None and k == 0:
            write_figure(figure, scenes[: len(shown)], shown)
        n = len(scenes)
        shares[prompt_seed] = {a: hits[a] / n for a in ATTRIBUTES}
        cells = " | ".join(f"{100 * hits[a] / n:.0f} %" for a in ATTRIBUTES)
        rows.append(f"| {set_label(prompt_seed)}, {n} prompts | {cells} | {100 * all_four / n:.0f} % |")
    print(f"\n## {name}: {size}x{size}, {steps} steps, {sampler}/{scheduler}, guidance 1")
    print("| held-out prompts | " + " | ".join(ATTRIBUTES) + " | background+colour+shape+position |")
    print("|" + "---|" * (len(ATTRIBUTES) + 2))
    print("\n".join(rows))
    med = {key: statistics.median(v) for key, v in timings.items()}
    print(
        f"time per image (median): {med['total']:.2f} s = text encoding {med['encode']:.3f} s + denoising "
        f"{med['denoise']:.2f} s + decoding {med['decode']:.2f} s + JPEG encoding {med['jpeg']:.3f} s"
    )
    sys.stdout.flush()
    return shares


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--n", type=int, default=100, help="held-out prompts per set")
    p.add_argument(
        "--prompt-seeds", default="2026,0",
        help="held-out prompt sets, by seed (comma-separated): 2026 is fresh, 0 chose between model versions",
    )  # fmt: skip
    p.add_argument("--model", type=Path, default=DEMO_DIR)
    p.add_argument("--configs", default="default,512,euler,8steps", help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--save-examples", type=Path, default=None, help="save the first images of each config here")
    p.add_argument(
        "--figure", type=Path, default=None,
        help="write ground truth against the first images of the first config and prompt set here",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.save_examples:
        args.save_examples.mkdir(parents=True, exist_ok=True)
    model = load_model(Settings(model=args.model, device="cpu"))
    pipe = SD3Pipeline(model)
    prompt_sets = {seed: world.held_out_scenes(args.n, seed) for seed in map(int, args.prompt_seeds.split(","))}
    print(f"model {args.model}; torch threads {torch.get_num_threads()}")
    for k, name in enumerate(args.configs.split(",")):
        run_config(pipe, name, prompt_sets, args.save_examples, args.figure if k == 0 else None)


if __name__ == "__main__":
    main()
