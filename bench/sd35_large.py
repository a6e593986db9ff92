"""The SD3.5 Large (Turbo) architecture with random weights, for benchmarks only (never used to serve).

Timing and memory do not depend on the weights' values. Numbers from the published diffusers configs of
stabilityai/stable-diffusion-3.5-large(-turbo) (transformer/, text_encoder*/, vae/ config.json) and the
diffusers SD3 docs:
- SD3Transformer2DModel: 38 joint blocks, 38 heads × 64 = hidden 2432, patch 2, 16 latent channels,
  joint_attention_dim 4096, pooled_projection_dim 2048, caption_projection_dim 2432, pos_embed_max_size 192,
  qk_norm "rms_norm", no dual-attention layers (those are SD3.5 Medium's).
- text_encoder (CLIP-L/14 with projection): hidden 768, 12 layers, 12 heads, MLP 3072, projection 768, quick_gelu.
- text_encoder_2 (OpenCLIP bigG/14 with projection): hidden 1280, 32 layers, 20 heads, MLP 5120, projection
  1280, gelu.
- text_encoder_3 (T5 v1.1 XXL encoder): d_model 4096, 24 layers, 64 heads × 64, d_ff 10240, gated-gelu.
- vae (AutoencoderKL): 16 latent channels, block_out_channels 128/256/512/512, 2 layers per block, scaling
  1.5305, shift 0.0609, no quant convs.
- scheduler: FlowMatchEulerDiscreteScheduler, shift 3.0.
``reduced=True`` keeps every class and the text-token count but shrinks widths and depths to run on a CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # the demo model's tooling: sd3demo
from sd3demo.tokenization import build_clip_tokenizer, build_t5_tokenizer

T_TXT = 77 + 256  # CLIP tokens + T5 tokens, as the pipeline pads them
LAYERS, HIDDEN = 38, 2432


def transformer_flops(width: int, height: int, *, layers: int = LAYERS, d: int = HIDDEN) -> float:
    """Matmul FLOPs of one transformer forward: per block and stream 2·12·d²·T (QKV, out, MLP), joint attention
    4·T²·d with T = T_img + T_txt."""
    t_img = (height // 16) * (width // 16)
    t = t_img + T_TXT
    return layers * (2 * 12 * d * d * (t_img + T_TXT) + 4 * t * t * d)


def build_pipeline(*, reduced: bool, dtype: torch.dtype, device: str, with_t5: bool = True) -> StableDiffusion3Pipeline:
    torch.manual_seed(0)
    s = 8 if reduced else 1  # width divisor
    layers = 2 if reduced else LAYERS
    heads = 38 // (s // 2 or 1) if reduced else 38
    vocab = len(build_clip_tokenizer())
    clip_l = CLIPTextConfig(
        hidden_size=768 // s, num_hidden_layers=2 if reduced else 12, num_attention_heads=12 // (s // 4 or 1),
        intermediate_size=3072 // s, projection_dim=768 // s, hidden_act="quick_gelu", vocab_size=vocab,
        max_position_embeddings=77,
    )  # fmt: skip
    clip_g = CLIPTextConfig(
        hidden_size=1280 // s, num_hidden_layers=2 if reduced else 32, num_attention_heads=20 // (s // 4 or 1),
        intermediate_size=5120 // s, projection_dim=1280 // s, hidden_act="gelu", vocab_size=vocab,
        max_position_embeddings=77,
    )  # fmt: skip
    t5_dim = 4096 // s
    with torch.device("meta" if not reduced else "cpu"):
        t5_config = T5Config(
            d_model=t5_dim, num_layers=2 if reduced else 24, num_heads=64 // s, d_kv=64, d_ff=10240 // s,
            feed_forward_proj="gated-gelu", vocab_size=len(build_t5_tokenizer()), is_encoder_decoder=False,
        )  # fmt: skip
        t5 = T5EncoderModel(t5_config) if with_t5 else None
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=t5_dim,
            caption_projection_dim=64 * heads, pooled_projection_dim=(768 + 1280) // s, pos_embed_max_size=192,
            qk_norm="rms_norm",
        )  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=tuple(c // s for c in (128, 256, 512, 512)),
            layers_per_block=2, norm_num_groups=32 // s if reduced else 32, use_quant_conv=False,
            use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609, sample_size=1024,
        )  # fmt: skip
        text_encoder, text_encoder_2 = CLIPTextModelWithProjection(clip_l), CLIPTextModelWithProjection(clip_g)
    modules = [m for m in (transformer, vae, text_encoder, text_encoder_2, t5) if m is not None]
    for m in modules:
        if not reduced:  # random values straight on the device: no 16 GB of CPU init
            m.to_empty(device=device)
            for p in m.parameters():
                torch.nn.init.normal_(p, std=0.02)
        m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusion3Pipeline(
        transformer=transformer, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        text_encoder_3=t5, tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(),
        tokenizer_3=build_t5_tokenizer() if with_t5 else None,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )  # fmt: skip
