"""Build a small SD3-architecture model in diffusers layout, from nothing but a seed.

The same classes as SD3.5 Large Turbo (two CLIP text encoders with projection, an optional T5 encoder,
``SD3Transformer2DModel``, a 16-channel ``AutoencoderKL``) at toy widths, with character-level tokenizers
(:mod:`sd3demo.tokenization`, SD3's 77-token CLIP window) so that nothing is downloaded. Tests use it as a fixture,
benchmarks as a stand-in; the demo model's trainer (:mod:`sd3demo.train`) builds its transformer with
:func:`small_sd3_transformer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from sd3demo.tokenization import build_clip_tokenizer, build_t5_tokenizer


@dataclass(frozen=True)
class TinySD3Config:
    seed: int = 0
    hidden: int = 32  # transformer width: num_attention_heads * attention_head_dim
    heads: int = 2
    layers: int = 2
    patch: int = 2
    text_dim: int = 32  # CLIP hidden size; the two CLIP projections are concatenated into `pooled`
    t5_dim: int = 64  # the joint attention width; at least 2 * text_dim, as SD3 (2048 CLIP, 4096 T5)
    with_t5: bool = True
    vae_channels: tuple[int, ...] = (8, 8, 8, 8)  # 4 blocks: 8x downsampling, as SD3
    max_pixels_side: int = 2048  # the largest side the contract serves
    shift: float = 3.0


def small_sd3_transformer(
    *, hidden: int, heads: int, layers: int, patch: int, text_dim: int, t5_dim: int, vae_factor: int,
    pos_embed_max_size: int | None,
) -> SD3Transformer2DModel:  # fmt: skip
    """An ``SD3Transformer2DModel`` shaped like SD3.5's (16 latent channels, qk RMS-norm) at a small width.

    ``pos_embed_max_size`` as in SD3: the side, in tokens, of one fixed grid of positions that every image takes
    its centre crop of (so it must cover the largest size served). ``None`` instead spreads the same range of
    positions over every image (diffusers' interpolated sin-cos embedding): a token's position is then relative
    to the picture, "the top left" is the same embedding at every size, and any size can be served.
    """
    return SD3Transformer2DModel(
        sample_size=1024 // vae_factor,
        patch_size=patch,
        in_channels=16,
        out_channels=16,
        num_layers=layers,
        attention_head_dim=hidden // heads,
        num_attention_heads=heads,
        # SD3 concatenates the CLIP hidden states (2 x text_dim) and zero-pads them to the T5 width.
        joint_attention_dim=t5_dim,
        caption_projection_dim=hidden,
        pooled_projection_dim=2 * text_dim,
        pos_embed_max_size=pos_embed_max_size,
        qk_norm="rms_norm",
    )


def build_tiny_sd3(out_dir: Path, config: TinySD3Config | None = None) -> Path:
    """Create the model with seeded random weights and save it in diffusers layout at ``out_dir``."""
    from diffusers import StableDiffusion3Pipeline

    cfg = config or TinySD3Config()
    if cfg.t5_dim < 2 * cfg.text_dim:
        raise ValueError("t5_dim must be at least 2 * text_dim: SD3 pads the CLIP states to the T5 width")
    torch.manual_seed(cfg.seed)
    clip_tok = build_clip_tokenizer()
    clip_cfg = CLIPTextConfig(
        vocab_size=len(clip_tok),
        hidden_size=cfg.text_dim,
        intermediate_size=cfg.text_dim * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=cfg.text_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModelWithProjection(clip_cfg)
    text_encoder_2 = CLIPTextModelWithProjection(clip_cfg)
    text_encoder_3 = tokenizer_3 = None
    if cfg.with_t5:
        tokenizer_3 = build_t5_tokenizer()
        t5_cfg = T5Config(
            vocab_size=len(tokenizer_3),
            d_model=cfg.t5_dim,
            d_kv=8,
            d_ff=cfg.t5_dim * 2,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
        text_encoder_3 = T5EncoderModel(t5_cfg)
    vae_factor = 2 ** (len(cfg.vae_channels) - 1)
    transformer = small_sd3_transformer(
        hidden=cfg.hidden, heads=cfg.heads, layers=cfg.layers, patch=cfg.patch, text_dim=cfg.text_dim,
        t5_dim=cfg.t5_dim, vae_factor=vae_factor,
        pos_embed_max_size=cfg.max_pixels_side // vae_factor // cfg.patch,  # covers the largest size served
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=min(cfg.vae_channels),
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
