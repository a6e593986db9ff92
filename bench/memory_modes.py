"""What each memory mode does to the pictures, on the CPU: PSNR against the bf16 pictures for the same seeds.

    python bench/memory_modes.py            # the demo model (trained) and the reduced SD3.5 Large architecture

Two models, bf16 compute, 4 steps, guidance 1, 256² (reduced: 128²), prompts of the demo's grammar:
- the embedded demo model: trained weights, so the pictures have content to lose;
- the reduced SD3.5 Large architecture (bench/sd35_large.py, ``reduced=True``: every class, widths / 8, 2 layers per
  encoder and transformer), default random initialisation: the real layer types and their fp8 rounding, with no
  trained content.
Rows: fp8 storage of the transformer and T5 (``fp8``), of T5 only (``t5-fp8``), and no T5 (``no-t5``: the CLIP
encoders alone, which changes what the model is told, not only the last bits). Offload modes move weights, not
values: they give the same pictures as the mode they offload.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sd3serve.engine.job import GenerationJob
from sd3serve.engine.loading import demo_model_dir
from sd3serve.engine.pipeline import build_pipeline
from sd3serve.settings import Settings
from sd35_large import build_pipeline as build_sd35

PROMPTS = ["a red circle at the top left on a blue background", "a large green square", "a small white cross on a "
           "black background", "a purple diamond at the bottom"]  # fmt: skip
MODES = {"fp8": {"weights": "fp8"}, "t5-fp8": {"weights": "t5-fp8"}, "no-t5": {"load_t5": False}}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def pictures(model_dir: Path, size: int, **options: object) -> list[np.ndarray]:
    engine = build_pipeline(Settings(model=model_dir, device="cpu", dtype="bfloat16", prompt_cache_mb=0, **options))
    out = []
    for seed, prompt in enumerate(PROMPTS):
        job = GenerationJob(
            prompt=prompt, negative_prompt="", steps=4, guidance_scale=1.0, seed=seed, sampler="dpmpp_2m",
            scheduler="sgm_uniform", width=size, height=size, batch_size=1,
        )  # fmt: skip
        out.append(np.asarray(engine(job).images[0]))
    return out


def reduced_sd35(out: Path) -> Path:
    """The reduced SD3.5 Large architecture saved as a diffusers directory, so it loads like any model."""
    pipe = build_sd35(reduced=True, dtype=torch.float32, device="cpu")
    pipe.save_pretrained(out)
    return out


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        models = [("demo model (trained)", demo_model_dir(), 256),
                  ("reduced SD3.5 Large (random)", reduced_sd35(Path(tmp) / "reduced"), 128)]  # fmt: skip
        print(f"PSNR (dB) against bf16, same seeds; mean over {len(PROMPTS)} prompts, 4 steps")
        print(f"{'model':<30} " + " ".join(f"{m:>8}" for m in MODES))
        for name, path, size in models:
            reference = pictures(path, size)
            row = []
            for options in MODES.values():
                pics = pictures(path, size, **options)
                row.append(np.mean([psnr(a, b) for a, b in zip(reference, pics, strict=True)]))
            print(f"{name:<30} " + " ".join(f"{v:>8.1f}" for v in row))


if __name__ == "__main__":
    main()
