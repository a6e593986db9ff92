"""Random LoRA adapter files for the tiny test model (diffusers/PEFT layout)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from sd3serve.engine.loading import LoadedModel
from sd3serve.engine.lora import linear_modules

RANK = 2


def random_layers(model: LoadedModel, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Strong random updates of every attention projection of the first block (enough to change a picture)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in linear_modules(model.pipe.transformer).items():
        if name.startswith("transformer_blocks.0.attn.") and name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
            out[name] = (
                torch.randn(RANK, m.in_features, generator=gen),
                torch.randn(m.out_features, RANK, generator=gen),
            )
    return out


def peft_file(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
    state = {}
    for name, (down, up) in layers.items():
        state[f"transformer.{name}.lora_A.weight"] = down.clone()
        state[f"transformer.{name}.lora_B.weight"] = up.contiguous()
    save_file(state, str(path))
    return path


