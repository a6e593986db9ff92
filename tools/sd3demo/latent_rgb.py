"""Fit the demo model's latent→RGB preview map from its own VAE, and write it next to the model.

    cd tools && OMP_NUM_THREADS=1 PYTHONPATH=../src ../.venv/bin/python -m sd3demo.latent_rgb --scenes 64 --seed 0

Scenes of the demo world (``world.random_scene``, rendered at ``--size``) are encoded by the demo VAE to their latent
mean, in the model's latent space ``(z - shift) · scale``; the same latents are decoded and the pictures averaged
over each latent cell. The map is the least-squares fit of those RGB values (in [-1, 1]) on the latents, with a
bias: 16 x 3 weights and 3 biases (``sd3serve.engine.previews.fit``). Held-out scenes then measure its error
against the zero map (every preview mid-grey) and SD3's published map.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

from sd3demo import world
from sd3serve.engine.loading import load_model
from sd3serve.engine.model import LoadedModel
from sd3serve.engine.previews import DEMO_MAP, SD3, LatentRGB, decoded_at_latent_grid, fit
from sd3serve.settings import Settings


@torch.no_grad()
def scene_latents(model: LoadedModel, n: int, size: int, seed: int) -> torch.Tensor:
    """(n, C, size/f, size/f): random demo scenes encoded by the VAE, in the model's latent space."""
    rng = random.Random(seed)
    pixels = torch.stack([
        torch.from_numpy(np.array(world.render(world.random_scene(rng), size))).permute(2, 0, 1).float() / 127.5 - 1
        for _ in range(n)
    ])  # fmt: skip
    vae = model.pipe.vae
    z = vae.encode(pixels.to(model.device, model.dtype)).latent_dist.mode().float()
    return ((z - vae.config.shift_factor) * vae.config.scaling_factor).cpu()


def mse(latent_rgb: LatentRGB | None, latents: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error in [-1, 1] RGB of a map's previews (None: the zero map, all grey) against the decode."""
    guess = torch.zeros_like(target) if latent_rgb is None else latent_rgb.linear(latents).clamp(-1, 1)
    return float(((guess - target) ** 2).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=64, help="scenes fitted on (as many again are held out)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=DEMO_MAP)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    model = load_model(Settings.model_validate({"device": "cpu"}))
    train = scene_latents(model, args.scenes, args.size, args.seed)
    held = scene_latents(model, args.scenes, args.size, args.seed + 1)
    fitted = fit(train, decoded_at_latent_grid(model, train))
    target = decoded_at_latent_grid(model, held)
    for name, m in (("fitted", fitted), ("zero", None), ("sd3", SD3)):
        print(f"held-out MSE ({name} map): {mse(m, held, target):.6f}")
    args.out.write_text(fitted.to_json() + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
