"""The SD3.5 Large (Turbo) architecture with random weights, for benchmarks only (never used to serve).

Timing and memory do not depend on the weights' values. Numbers from the published diffusers configs of
stabilityai/stable-diffusion-3.5-large(-turbo) (transformer/, text_encoder*/, vae/ config.json) and the
diffusers SD3 docs:
- SD3Transformer2DModel: 38 joint blocks, 38 heads × 64 = hidden 2432, patch 2, 16 latent channels,
  joint_attention_dim 4096, pooled_projection_dim 2048, caption_projection_dim 2432, pos_embed_max_size 192,
  qk_norm "rms_norm", no dual-attention layers (those are SD3.5 Medium's).
- text_encoder (CLIP-L/14 with projection): hidden 768, 12 layers, 12 heads, MLP 3072, projection 768, quick_gelu,
  vocabulary 49408, 77 positions.
- text_encoder_2 (OpenCLIP bigG/14 with projection): hidden 1280, 32 layers, 20 heads, MLP 5120, projection
  1280, gelu, vocabulary 49408, 77 positions.
- text_encoder_3 (T5 v1.1 XXL encoder): d_model 4096, 24 layers, 64 heads × 64, d_ff 10240, gated-gelu,
  vocabulary 32128; its tokenizer's model_max_length is 512 (the engine pads to 256).
- vae (AutoencoderKL): 16 latent channels, block_out_channels 128/256/512/512, 2 layers per block, scaling
  1.5305, shift 0.0609, no quant convs, sample_size 1024.
- scheduler: FlowMatchEulerDiscreteScheduler, shift 3.0.
``configs(reduced=True)`` keeps every class and the text-token count but shrinks widths and depths to run on a CPU.
``write_configs(dir)`` writes them as a diffusers directory without weights (what ``sd3serve plan`` reads).

Full size, the modules are built with their parameters on the meta device and their buffers computed as usual, then
materialised on the target device directly in the target dtype (no fp32 copy, no CPU copy for a GPU), parameters
filled with random values and buffers restored (``materialize``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the demo model's tooling: sd3demo
from sd3demo.tokenization import build_clip_tokenizer, build_t5_tokenizer

T_TXT = 77 + 256  # CLIP tokens + T5 tokens, as the pipeline pads them
LAYERS, HIDDEN = 38, 2432
T5_TOKENIZER_MAX_LENGTH = 512


def transformer_flops(width: int, height: int, *, layers: int = LAYERS, d: int = HIDDEN) -> float:
    """Matmul FLOPs of one transformer forward: per block and stream 2·12·d²·T (QKV, out, MLP), joint attention
    4·T²·d with T = T_img + T_txt."""
    t_img = (height // 16) * (width // 16)
    t = t_img + T_TXT
    return layers * (2 * 12 * d * d * (t_img + T_TXT) + 4 * t * t * d)


def configs(*, reduced: bool = False) -> dict[str, dict[str, Any]]:
    """Each component's config (diffusers/transformers keyword arguments), full size or reduced."""
    s = 8 if reduced else 1  # width divisor
    heads = 38 // (s // 2 or 1) if reduced else 38
    t5_dim = 4096 // s
    return {
        "transformer": dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=2 if reduced else LAYERS,
            attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=t5_dim,
            caption_projection_dim=64 * heads, pooled_projection_dim=(768 + 1280) // s, pos_embed_max_size=192,
            qk_norm="rms_norm", dual_attention_layers=[],
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[c // s for c in (128, 256, 512, 512)],
            layers_per_block=2, norm_num_groups=32 // s if reduced else 32, use_quant_conv=False,
            use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
        ),
        "text_encoder": dict(
            hidden_size=768 // s, num_hidden_layers=2 if reduced else 12, num_attention_heads=12 // (s // 4 or 1),
            intermediate_size=3072 // s, projection_dim=768 // s, hidden_act="quick_gelu", vocab_size=49408,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
        "text_encoder_2": dict(
            hidden_size=1280 // s, num_hidden_layers=2 if reduced else 32, num_attention_heads=20 // (s // 4 or 1),
            intermediate_size=5120 // s, projection_dim=1280 // s, hidden_act="gelu", vocab_size=49408,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        ),
        "text_encoder_3": dict(
            d_model=t5_dim, num_layers=2 if reduced else 24, num_heads=64 // s, d_kv=64, d_ff=10240 // s,
            feed_forward_proj="gated-gelu", vocab_size=32128, is_encoder_decoder=False,
        ),
    }  # fmt: skip


def construct(name: str, config: dict[str, Any]) -> torch.nn.Module:
    if name == "transformer":
        return SD3Transformer2DModel(**config)
    if name == "vae":
        return AutoencoderKL(**config)
    if name == "text_encoder_3":
        return T5EncoderModel(T5Config(**config))
    return CLIPTextModelWithProjection(CLIPTextConfig(**config))


def materialize(
    name: str, config: dict[str, Any], *, dtype: torch.dtype, device: str | torch.device
) -> torch.nn.Module:
    """The component with random weights, allocated once, on ``device`` in ``dtype``; buffers as constructed."""
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers computed on the CPU
        module = construct(name, config)
    module.to(dtype)  # free for meta parameters; casts floating buffers as loading in `dtype` would
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    module.to_empty(device=device)  # allocates parameters and buffers, uninitialised
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(std=0.02, generator=gen)
            else:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)  # norm scales 1, biases 0
        for bname, b in module.named_buffers():
            b.copy_(buffers[bname])
    return module


def build_pipeline(
    *, reduced: bool, dtype: torch.dtype, device: str | torch.device, with_t5: bool = True
) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    cfg = configs(reduced=reduced)
    names = ["transformer", "vae", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if with_t5 else [])
    modules: dict[str, torch.nn.Module] = {}
    for name in names:
        if reduced:  # small: constructed normally (default initialisation) on the CPU
            modules[name] = construct(name, cfg[name]).to(device=device, dtype=dtype)
        else:
            modules[name] = materialize(name, cfg[name], dtype=dtype, device=device)
        modules[name].eval().requires_grad_(False)
    return StableDiffusion3Pipeline(
        transformer=modules["transformer"], vae=modules["vae"], text_encoder=modules["text_encoder"],
        text_encoder_2=modules["text_encoder_2"], text_encoder_3=modules.get("text_encoder_3"),
        tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=build_t5_tokenizer() if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )  # fmt: skip


def write_configs(out: Path, *, reduced: bool = False) -> Path:
    """The model as a diffusers directory of config files only (no weights, no tokenizer vocabularies)."""
    classes = {"transformer": ("diffusers", "SD3Transformer2DModel"), "vae": ("diffusers", "AutoencoderKL"),
               "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
               "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
               "text_encoder_3": ("transformers", "T5EncoderModel")}  # fmt: skip
    index: dict[str, Any] = {"_class_name": "StableDiffusion3Pipeline", **{k: list(v) for k, v in classes.items()}}
    index |= {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
              "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
              "tokenizer_3": ["transformers", "T5TokenizerFast"]}  # fmt: skip
    files: dict[str, dict[str, Any]] = {"model_index.json": index}
    for name, config in configs(reduced=reduced).items():
        library, cls = classes[name]
        extra = {"architectures": [cls], "model_type": "t5" if name == "text_encoder_3" else "clip_text_model"}
        files[f"{name}/config.json"] = {"_class_name": cls, **config} if library == "diffusers" else {**config, **extra}
    files["scheduler/scheduler_config.json"] = {"_class_name": "FlowMatchEulerDiscreteScheduler",
                                                "num_train_timesteps": 1000, "shift": 3.0}  # fmt: skip
    files["tokenizer_3/tokenizer_config.json"] = {"model_max_length": T5_TOKENIZER_MAX_LENGTH}
    for rel, content in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import sys

    print(write_configs(Path(sys.argv[1] if len(sys.argv) > 1 else "sd3.5-large-turbo-configs")))
