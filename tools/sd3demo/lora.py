"""Train a LoRA adapter for the demo model on the CPU: striped backgrounds, a style the base model never draws.

    PYTHONPATH=tools .venv/bin/python -m sd3demo.lora --out DIR/striped.safetensors --steps 600 --seed 0

The demo world's training scenes are rendered with a striped background (``world.render_striped``), encoded by the
demo VAE, and a rank-r update of every attention and feed-forward projection of the frozen transformer is trained
with the demo's rectified-flow loss (velocity ε - x0, σ as the demo was trained). The captions are the plain ones:
the adapter, not the prompt, asks for stripes. Saved in the diffusers/PEFT layout
(``transformer.<module>.lora_A.weight``, ``lora_B.weight``, ``alpha``), which ``sd3serve --lora-dir`` reads.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import save_file

from sd3demo import world
from sd3demo.train import sample_sigmas

DEMO = Path(__file__).resolve().parents[2] / "src" / "sd3serve" / "models" / "demo"
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
           "attn.add_v_proj", "ff.net.0.proj", "ff.net.2")  # fmt: skip


def targets(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {
        name: m
        for name, m in transformer.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith("transformer_blocks.") and name.endswith(TARGETS)
    }


def train_lora(out: Path, *, steps: int, rank: int, size: int, batch: int, lr: float, seed: int) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(DEMO), local_files_only=True)
    transformer, vae = pipe.transformer.eval().requires_grad_(False), pipe.vae.eval().requires_grad_(False)
    layers = targets(transformer)
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    hooks = []
    for name, layer in layers.items():
        down = torch.nn.Parameter(torch.randn(rank, layer.in_features, generator=gen) / layer.in_features**0.5)
        up = torch.nn.Parameter(torch.zeros(layer.out_features, rank))
        params[name] = (down, up)
        hooks.append(layer.register_forward_hook(
            lambda _m, args, y, d=down, u=up: y + F.linear(F.linear(args[0], d), u)
        ))  # fmt: skip
    opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=lr, weight_decay=0.0)

    scenes = [world.training_scene(rng) for _ in range(max(256, batch * 16))]
    captions = [s.caption() for s in scenes]
    with torch.no_grad():
        images = np.stack([np.asarray(world.render_striped(s, size)) for s in scenes])
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = torch.cat([vae.encode(c).latent_dist.mode() for c in pixels.split(32)])
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=pipe.tokenizer_3.model_max_length,
        )  # fmt: skip
    t0 = time.perf_counter()
    running = None
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50)
        idx = torch.randint(len(scenes), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(batch, gen, 3.0)
        s = sigma.view(-1, 1, 1, 1)
        v = transformer(hidden_states=(1 - s) * x0 + s * noise, encoder_hidden_states=embeds[idx],
                        pooled_projections=pooled[idx], timestep=sigma * 1000, return_dict=False)[0]  # fmt: skip
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}/{steps} loss {running:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for h in hooks:
        h.remove()
    state: dict[str, torch.Tensor] = {}
    for name, (down, up) in params.items():
        state[f"transformer.{name}.lora_A.weight"] = down.detach().contiguous()
        state[f"transformer.{name}.lora_B.weight"] = up.detach().contiguous()
        state[f"transformer.{name}.alpha"] = torch.tensor(float(rank))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"style": "striped backgrounds", "rank": str(rank), "steps": str(steps),
                                         "seed": str(seed), "base": "sd3serve demo model"})  # fmt: skip
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--size", type=int, default=256, help="training pictures' side")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    train_lora(a.out, steps=a.steps, rank=a.rank, size=a.size, batch=a.batch, lr=a.lr, seed=a.seed)


if __name__ == "__main__":
    main()
