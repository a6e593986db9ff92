"""Write a diffusers SD3 transformer as an original (SAI / ComfyUI) single-file checkpoint, for loading tests.

The inverse of diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` (no dual-attention layers).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from safetensors.torch import save_file


def _swap_scale_shift(w: torch.Tensor) -> torch.Tensor:
    scale, shift = w.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def transformer_to_original(
    model: SD3Transformer2DModel, prefix: str = "model.diffusion_model."
) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "pos_embed": sd.pop("pos_embed.pos_embed"),
        "x_embedder.proj.weight": sd.pop("pos_embed.proj.weight"),
        "x_embedder.proj.bias": sd.pop("pos_embed.proj.bias"),
        "context_embedder.weight": sd.pop("context_embedder.weight"),
        "context_embedder.bias": sd.pop("context_embedder.bias"),
        "final_layer.linear.weight": sd.pop("proj_out.weight"),
        "final_layer.linear.bias": sd.pop("proj_out.bias"),
        "final_layer.adaLN_modulation.1.weight": _swap_scale_shift(sd.pop("norm_out.linear.weight")),
        "final_layer.adaLN_modulation.1.bias": _swap_scale_shift(sd.pop("norm_out.linear.bias")),
    }
    for ours, theirs in (("timestep_embedder", "t_embedder"), ("text_embedder", "y_embedder")):
        for i, j in ((1, 0), (2, 2)):
            for p in ("weight", "bias"):
                out[f"{theirs}.mlp.{j}.{p}"] = sd.pop(f"time_text_embed.{ours}.linear_{i}.{p}")
    n = model.config.num_layers
    for i in range(n):
        b, a = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        last = i == n - 1
        for p in ("weight", "bias"):
            out[f"{b}.x_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{a}.attn.to_{c}.{p}") for c in "qkv"])
            out[f"{b}.context_block.attn.qkv.{p}"] = torch.cat([sd.pop(f"{a}.attn.add_{c}_proj.{p}") for c in "qkv"])
            out[f"{b}.x_block.attn.proj.{p}"] = sd.pop(f"{a}.attn.to_out.0.{p}")
            out[f"{b}.x_block.adaLN_modulation.1.{p}"] = sd.pop(f"{a}.norm1.linear.{p}")
            ctx_mod = sd.pop(f"{a}.norm1_context.linear.{p}")
            out[f"{b}.context_block.adaLN_modulation.1.{p}"] = _swap_scale_shift(ctx_mod) if last else ctx_mod
            out[f"{b}.x_block.mlp.fc1.{p}"] = sd.pop(f"{a}.ff.net.0.proj.{p}")
            out[f"{b}.x_block.mlp.fc2.{p}"] = sd.pop(f"{a}.ff.net.2.{p}")
            if not last:
                out[f"{b}.context_block.attn.proj.{p}"] = sd.pop(f"{a}.attn.to_add_out.{p}")
                out[f"{b}.context_block.mlp.fc1.{p}"] = sd.pop(f"{a}.ff_context.net.0.proj.{p}")
                out[f"{b}.context_block.mlp.fc2.{p}"] = sd.pop(f"{a}.ff_context.net.2.{p}")
        for ours, theirs in (
            ("norm_q", "x_block.attn.ln_q"),
            ("norm_k", "x_block.attn.ln_k"),
            ("norm_added_q", "context_block.attn.ln_q"),
            ("norm_added_k", "context_block.attn.ln_k"),
        ):
            if f"{a}.attn.{ours}.weight" in sd:
                out[f"{b}.{theirs}.weight"] = sd.pop(f"{a}.attn.{ours}.weight")
    if sd:
        raise ValueError(f"unconverted keys: {sorted(sd)}")
    return {prefix + k: v for k, v in out.items()}


def save_transformer_single_file(model_dir: Path, out: Path) -> Path:
    model = SD3Transformer2DModel.from_pretrained(model_dir / "transformer")
    save_file(transformer_to_original(model), str(out))
    return out
