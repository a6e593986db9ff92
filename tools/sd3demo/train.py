"""Train the embedded demo model: a small SD3-architecture model that draws the shapes world of ``world.py``.

``PYTHONPATH=tools python -m sd3demo.train --out DIR [--minutes M] [--seed S] [--threads T]``

1. Build the components (the classes of SD3.5: two CLIP text encoders with projection, a T5 encoder,
   ``SD3Transformer2DModel``, a 16-channel ``AutoencoderKL`` with 16× downsampling) and word-level tokenizers
   with 16-token windows.
2. Train the autoencoder on rendered pictures (reconstruction), freeze it, and set its ``shift_factor`` /
   ``scaling_factor`` from the latents' statistics.
3. Encode pools of training pictures at 256², 512², 768² and 1024².
4. Pretrain the text encoders to name each attribute of a caption's scene (:func:`pretrain_text_encoders`), and
   freeze them, as SD3 uses pretrained, frozen encoders.
5. Train the transformer with SD3's rectified-flow objective (velocity ``ε - x0`` at ``x = (1-σ)·x0 + σ·ε``), σ
   from a logit-normal shifted by 3 mixed with the σ of few-step schedules, at every resolution.
6. Save the pipeline (EMA weights) in diffusers layout, safetensors.

Step counts follow from ``--minutes`` by fixed per-step cost estimates, never from the clock, so a rerun with
the same arguments (and thread count) gives the same weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from sd3demo import world
from sd3demo.tiny import small_sd3_transformer
from sd3demo.tokenization import build_clip_tokenizer, build_t5_tokenizer

# Text windows, in tokens: the tokenizers' ``model_max_length``. diffusers pads the CLIP prompt to it, and the engine
# pads T5 to ``min(256, model_max_length)``. The longest caption of the world is 14 CLIP / 13 T5 tokens; SD3's 77 +
# 256 would be 333 mostly-padding tokens that every transformer block carries, 5× the 64 image tokens of a 256²
# picture.
CLIP_LENGTH = 16
T5_LENGTH = 16
FEW_STEP_SIGMAS = (1.0, 0.9004, 0.7511, 0.5030, 0.3, 0.15)  # 4-step sgm_uniform at shift 3, then lower


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    text_dim: int = 32  # CLIP width; the pooled vector is 2 × this
    t5_dim: int = 64  # T5 width = the transformer's joint_attention_dim (≥ 2 × text_dim)
    hidden: int = 192  # transformer width (≥ 16 · patch²)
    heads: int = 6
    layers: int = 4
    patch: int = 2
    vae_channels: tuple[int, ...] = (8, 16, 32, 32, 32)  # 5 blocks: 16× downsampling
    # One norm group: the initial autoencoder (see `init_vae`) keeps every group balanced around an anchor.
    vae_groups: int = 1
    # Positions relative to the picture (see `small_sd3_transformer`): SD3's centre-cropped grid puts "the top
    # left" of a 512² and of a 1024² picture at different embeddings, which a model this small does not untangle.
    relative_positions: bool = True
    patch_embed_scale: float = 0.1  # on the default initialisation of the patch embedding (see build_components)
    adaln_zero: bool = True  # blocks start as the identity and the output at zero, as DiT initialises
    shift: float = 3.0


@dataclass
class Schedule:
    """Step counts and batch sizes; `for_minutes` scales them to a time budget by fixed cost estimates."""

    vae_steps: int = 200
    vae_batch: int = 8
    vae_crop: int = 128
    vae_lr: float = 1e-3
    pool: dict[int, int] = field(default_factory=lambda: {256: 4000, 512: 6000, 768: 1000, 1024: 1500})
    steps: int = 14000
    # resolution -> (share of steps, batch size). Little at 256²: a medium object there is 5 latent cells across,
    # too few to show its shape.
    mix: dict[int, tuple[float, int]] = field(
        default_factory=lambda: {256: (0.15, 8), 512: (0.55, 6), 768: (0.1, 3), 1024: (0.2, 2)}
    )
    lr: float = 1e-3
    # The text encoders are pretrained first (`pretrain_text_encoders`), then frozen, as SD3 trains.
    text_steps: int = 1000
    text_batch: int = 128
    text_lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.998
    # Extra loss weight on the latent cells the object covers: it is a few percent of the picture but most of what
    # the prompt says. Measured on 3000-step runs, 512²: object colour 99-100 % with weight 4 or 10 against 93-97 %
    # without, shape 23-29 % against 19-22 %, size 62-73 % against 81-85 %.
    object_weight: float = 4.0
    train_text_encoders: bool = False  # go on training them with the transformer (at text_lr)

    @classmethod
    def for_minutes(cls, minutes: float) -> Schedule:
        """The default schedule is sized for 50 minutes with two threads on the 2-core CPU (the shipped run: 29 s
        of autoencoder, 142 s of latent pools, 68 s of text encoders, 0.203 s a transformer step, 51.3 minutes in
        all); other budgets scale the step counts linearly."""
        s = cls()
        k = minutes / 50.0
        s.vae_steps = max(2, round(s.vae_steps * k))
        s.text_steps = max(2, round(s.text_steps * min(1.0, k)))
        s.pool = {r: max(4, round(n * min(1.0, k))) for r, n in s.pool.items()}
        s.steps = max(2, round(s.steps * k))
        s.warmup = min(s.warmup, max(1, s.steps // 10))
        return s


# ----------------------------------------------------------------------------------------------- tokenizers


def build_tokenizers() -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """The demo model's tokenizers: every word of the world's vocabulary is one token, windows of 16."""
    return build_clip_tokenizer(world.VOCABULARY, CLIP_LENGTH), build_t5_tokenizer(world.VOCABULARY, T5_LENGTH)


# ----------------------------------------------------------------------------------------------- components


@dataclass
class Components:
    tokenizer: CLIPTokenizer
    t5_tokenizer: T5TokenizerFast
    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL


def build_components(cfg: DemoConfig) -> Components:
    if cfg.t5_dim < 2 * cfg.text_dim:
        raise ValueError("t5_dim must be at least 2 * text_dim: SD3 pads the CLIP states to the T5 width")
    torch.manual_seed(cfg.seed)
    tok, t5_tok = build_tokenizers()
    clip_cfg = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=cfg.text_dim,
        intermediate_size=cfg.text_dim * 4,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=CLIP_LENGTH,
        projection_dim=cfg.text_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    t5_cfg = T5Config(
        vocab_size=len(t5_tok),
        d_model=cfg.t5_dim,
        d_kv=16,
        d_ff=cfg.t5_dim * 2,
        num_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    vae_factor = 2 ** (len(cfg.vae_channels) - 1)
    transformer = small_sd3_transformer(
        hidden=cfg.hidden, heads=cfg.heads, layers=cfg.layers, patch=cfg.patch, text_dim=cfg.text_dim,
        t5_dim=cfg.t5_dim, vae_factor=vae_factor,
        pos_embed_max_size=None if cfg.relative_positions else 2048 // vae_factor // cfg.patch,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=cfg.vae_channels,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=cfg.vae_groups,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    with torch.no_grad():
        # A small patch embedding: at high noise the tokens are mostly noise, and at the default scale it drowns
        # each token's position (what the picture's layout is drawn from) and makes the LayerNorms' scale depend
        # on the noise, which the velocity has to carry through linearly. Measured on 600 steps at 256²: the
        # prediction of x0 at σ = 1 three times closer than with the default initialisation.
        transformer.pos_embed.proj.weight.mul_(cfg.patch_embed_scale)
        if cfg.adaln_zero:
            # DiT's adaLN-Zero: every block's modulation (so its gates) and the output projection start at zero.
            for block in transformer.transformer_blocks:
                for norm in (block.norm1, block.norm1_context):
                    norm.linear.weight.zero_()
                    norm.linear.bias.zero_()
            transformer.proj_out.weight.zero_()
            transformer.proj_out.bias.zero_()
    return Components(
        tokenizer=tok,
        t5_tokenizer=t5_tok,
        text_encoder=CLIPTextModelWithProjection(clip_cfg),
        text_encoder_2=CLIPTextModelWithProjection(clip_cfg),
        text_encoder_3=T5EncoderModel(t5_cfg),
        transformer=transformer,
        vae=vae,
    )


class TextIds:
    """Token ids of captions, tokenized once (as the diffusers pipeline tokenizes them)."""

    def __init__(self, comps: Components) -> None:
        self.comps = comps
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        for c in captions:
            if c not in self.cache:
                clip = self.comps.tokenizer(
                    c, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt"
                ).input_ids[0]
                t5 = self.comps.t5_tokenizer(
                    c, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt"
                ).input_ids[0]
                self.cache[c] = (clip, t5)
        return (
            torch.stack([self.cache[c][0] for c in captions]),
            torch.stack([self.cache[c][1] for c in captions]),
        )


def run_text_encoders(
    comps: Components, clip_ids: torch.Tensor, t5_ids: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """What SD3 takes from its encoders: each CLIP's pooled vector and penultimate states, and the T5 states."""
    pooled, states = [], []
    for enc in (comps.text_encoder, comps.text_encoder_2):
        out = enc(clip_ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    return pooled, states, comps.text_encoder_3(t5_ids)[0]


def encode_text(comps: Components, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds, pooled) exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them (clip_skip None)."""
    pooled, states, t5 = run_text_encoders(comps, clip_ids, t5_ids)
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def text_features(comps: Components, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> list[torch.Tensor]:
    """What each encoder hands the transformer, one vector per caption: each CLIP's pooled vector and the mean of
    its penultimate states, and the mean of the T5 states."""
    pooled, states, t5 = run_text_encoders(comps, clip_ids, t5_ids)
    return [pooled[0], states[0].mean(1), pooled[1], states[1].mean(1), t5.mean(1)]


ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background": tuple(world.COLOURS),
    "colour": tuple(world.COLOURS),
    "shape": world.SHAPES,
    "position": tuple(world.POSITIONS),
    "size": tuple(world.SIZES),
}


def attribute_labels(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([values.index(getattr(s, a)) for s in scenes]) for a, values in ATTRIBUTES.items()}


def pretrain_text_encoders(comps: Components, sched: Schedule, rng: random.Random) -> dict[str, float]:
    """Teach the text encoders what the captions mean before the transformer sees them.

    SD3 uses text encoders pretrained elsewhere (CLIP's contrastive objective, T5's) and frozen. Here every output
    of every encoder (:func:`text_features`) learns to name each attribute of the caption's scene (background,
    colour, shape, position, size) through a linear head, thrown away afterwards: so each attribute is a direction
    of the pooled vector and of the token states, which the transformer's adaLN and attention read linearly.
    Trained from scratch together with the transformer instead, the encoders collapse onto what the transformer
    uses first, the background colour: after the 6500 steps of shapes-v2 "at the top left" and "at the bottom
    right" gave pooled vectors 0.3 % apart, and position was never learnt. Returns the heads' mean accuracy.
    """
    encoders = [comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3]
    text = TextIds(comps)
    dims = [f.shape[-1] for f in text_features(comps, *text(["a red circle"]))]
    heads = [nn.ModuleDict({a: nn.Linear(d, len(values)) for a, values in ATTRIBUTES.items()}) for d in dims]
    params = [p for m in [*encoders, *heads] for p in m.parameters()]
    for m in [*encoders, *heads]:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=sched.text_lr, weight_decay=0.0)

    def run(scenes: list[world.Scene]) -> tuple[torch.Tensor, float]:
        labels = attribute_labels(scenes)
        losses, hits = [], 0.0
        for head, f in zip(heads, text_features(comps, *text([s.caption() for s in scenes])), strict=True):
            for a, y in labels.items():
                logits = head[a](f)
                losses.append(F.cross_entropy(logits, y))
                hits += float((logits.argmax(-1) == y).float().mean())
        return torch.stack(losses).mean(), hits / len(losses)

    val = [world.random_scene(random.Random(777 + i)) for i in range(512)]
    t0 = time.perf_counter()
    for step in range(sched.text_steps):
        for g in opt.param_groups:
            g["lr"] = sched.text_lr * 0.5 * (1 + math.cos(math.pi * step / max(1, sched.text_steps)))
        loss, acc = run([world.training_scene(rng) for _ in range(sched.text_batch)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == sched.text_steps - 1:
            log(f"text step {step}/{sched.text_steps} loss {loss.item():.4f} accuracy {acc:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    for m in encoders:
        m.eval().requires_grad_(False)
    with torch.no_grad():
        loss, acc = run(val)
    log(f"text encoders: attribute accuracy {acc:.4f} on captions of any triple (loss {loss.item():.4f})")
    return {"attribute_accuracy": acc, "attribute_loss": float(loss)}


# ----------------------------------------------------------------------------------------------------- data


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    arr = np.stack(images).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def vae_batches(rng: random.Random, batch: int, crop: int) -> Iterator[torch.Tensor]:
    """Crops of pictures rendered at several sizes: objects from a few to a few hundred pixels across."""
    while True:
        images = []
        for _ in range(batch):
            size = rng.choice([crop, crop, 2 * crop, 4 * crop, 1024])
            im = np.asarray(world.render(world.training_scene(rng), size))
            y, x = rng.randrange(size - crop + 1), rng.randrange(size - crop + 1)
            images.append(im[y : y + crop, x : x + crop])
        yield to_tensor(images)


# ------------------------------------------------------------------------------------------------- training


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@torch.no_grad()
def init_vae(vae: AutoencoderKL, anchor: float = 50.0, lift: float = 20.0) -> None:
    """Start the autoencoder at a working linear one, which gradient descent alone finds only slowly.

    On flat-coloured pictures GroupNorm erases exactly what matters (each picture's colours), and a randomly
    initialised autoencoder sits for a long time at "every picture is the mean picture". Here every residual
    branch starts at zero; the encoder averages 2×2 at each level and ends in a space-to-depth that puts the
    mean colour of each 8×8 quarter of a 16×16 block into latent channels 0-11; the decoder starts from the
    block's mean colour with nearest upsampling. Each GroupNorm sees the signals next to their negatives and an
    anchor pair ±``anchor`` (so its mean is 0 and its scale fixed), and a ``lift`` keeps SiLU in its linear range.
    """
    from diffusers.models.resnet import ResnetBlock2D

    enc, dec = vae.encoder, vae.decoder
    for m in vae.modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.zero_()
        if isinstance(m, ResnetBlock2D):
            m.conv2.weight.zero_()
            if m.conv_shortcut is not None:
                m.conv_shortcut.weight.zero_()
                for c in range(3):
                    m.conv_shortcut.weight[c, c, 0, 0] = 1.0

    def centre_identity(conv: nn.Conv2d) -> None:
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 1, 1] = 1.0

    centre_identity(enc.conv_in)
    downs = [b.downsamplers[0].conv for b in enc.down_blocks if b.downsamplers is not None]
    for conv in downs[:-1]:
        conv.weight.zero_()
        for c in range(3):
            conv.weight[c, c, 0:2, 0:2] = 0.25
    last = downs[-1]
    last.weight.zero_()
    for dy in range(2):
        for dx in range(2):
            for c in range(3):
                q = 3 * (2 * dy + dx) + c
                last.weight[q, c, dy, dx] = 1.0
                last.weight[12 + q, c, dy, dx] = -1.0
    last.bias[24], last.bias[25] = anchor, -anchor
    gn = enc.conv_norm_out
    gn.weight.zero_()
    gn.bias.zero_()
    gn.weight[:12] = (2 * anchor**2 / last.out_channels) ** 0.5
    gn.bias[:12] = lift
    co = enc.conv_out
    co.weight.zero_()
    co.bias.zero_()
    for j in range(12):
        co.weight[j, j, 1, 1] = 1.0
        co.bias[j] = -lift
    co.bias[16:] = -12.0  # log-variance: a near-deterministic posterior

    dec.conv_in.weight.zero_()
    for q in range(4):
        for c in range(3):
            dec.conv_in.weight[c, 3 * q + c, 1, 1] = 0.25
    for b in dec.up_blocks:
        if b.upsamplers is not None:
            centre_identity(b.upsamplers[0].conv)
    sc = dec.up_blocks[-1].resnets[0].conv_shortcut
    sc.weight.zero_()
    for c in range(3):
        sc.weight[c, c, 0, 0] = 1.0
        sc.weight[3 + c, c, 0, 0] = -1.0
    sc.bias[6], sc.bias[7] = anchor, -anchor
    gn = dec.conv_norm_out
    gn.weight.zero_()
    gn.bias.zero_()
    gn.weight[:3] = (2 * anchor**2 / sc.out_channels) ** 0.5
    gn.bias[:3] = lift
    co = dec.conv_out
    co.weight.zero_()
    for c in range(3):
        co.weight[c, c, 1, 1] = 1.0
        co.bias[c] = -lift


@torch.no_grad()
def vae_error(vae: AutoencoderKL, images: torch.Tensor) -> float:
    return float(F.mse_loss(vae.decode(vae.encode(images).latent_dist.mean).sample, images))


def train_vae(vae: AutoencoderKL, sched: Schedule, rng: random.Random) -> dict[str, float]:
    """Linear start (:func:`init_vae`), then reconstruction training of the decoder's linear layers (conv_in,
    the upsampling convolutions, conv_out: training the residual branches too upsets the balanced GroupNorms);
    keeps whichever of the two reconstructs held-out pictures better."""
    init_vae(vae)
    val = next(vae_batches(random.Random(12345), 16, 256))
    before = vae_error(vae, val)
    start = copy.deepcopy(vae.state_dict())
    dec = vae.decoder
    params = [*dec.conv_in.parameters(), *dec.conv_out.parameters()]
    params += [p for b in dec.up_blocks if b.upsamplers is not None for p in b.upsamplers[0].conv.parameters()]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=sched.vae_lr)
    batches = vae_batches(rng, sched.vae_batch, sched.vae_crop)
    t0 = time.perf_counter()
    for step in range(sched.vae_steps):
        x = next(batches)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
        loss = F.mse_loss(vae.decode(z).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == sched.vae_steps - 1:
            log(f"vae step {step}/{sched.vae_steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval().requires_grad_(False)
    after = vae_error(vae, val)
    log(f"vae held-out mse: linear start {before:.4f}, trained {after:.4f}")
    if after > before:
        vae.load_state_dict(start)
    return {"vae_mse_linear": before, "vae_mse_trained": after}


@torch.no_grad()
def encode_fast(vae: AutoencoderKL, x: torch.Tensor) -> torch.Tensor:
    """``vae.encode(x).latent_dist.mean`` for the encoder that :func:`init_vae` builds (and training leaves alone).

    Its first three levels are exactly a 2×2 average each (the residual branches are zero), so they are replaced
    by one 8×8 average pooling, and the rest of the encoder runs as it is: the same numbers up to rounding, at
    1/64 of the cost (checked against the full encoder in :func:`train`).
    """
    enc = vae.encoder
    h = F.avg_pool2d(x, 8)
    h = torch.cat([h, h.new_zeros(h.shape[0], enc.down_blocks[3].resnets[0].in_channels - 3, *h.shape[2:])], 1)
    for block in enc.down_blocks[3:]:
        h = block(h)
    h = enc.mid_block(h)
    h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
    return h[:, : vae.config.latent_channels]


@dataclass
class Pool:
    """Training pictures of one size: captions, latents and each latent cell's share of object pixels."""

    captions: list[str]
    latents: torch.Tensor
    coverage: torch.Tensor  # (N, 1, h, w)


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, size: int, n: int, rng: random.Random) -> Pool:
    captions, latents, coverage = [], [], []
    chunk = max(1, 16 * 256 * 256 // (size * size))
    scenes = [world.training_scene(rng) for _ in range(n)]
    for i in range(0, n, chunk):
        part = scenes[i : i + chunk]
        arrays = [np.asarray(world.render(s, size)) for s in part]
        z = encode_fast(vae, to_tensor(arrays))
        objects = [np.any(a != world.COLOURS[s.background], axis=-1) for a, s in zip(arrays, part, strict=True)]
        mask = torch.from_numpy(np.stack(objects)).float().unsqueeze(1)
        latents.append(z)
        coverage.append(F.adaptive_avg_pool2d(mask, (z.shape[-2], z.shape[-1])))
        captions += [s.caption() for s in part]
    return Pool(captions, torch.cat(latents), torch.cat(coverage))


def sample_sigmas(n: int, gen: torch.Generator, shift: float) -> torch.Tensor:
    """Logit-normal σ shifted like SD3, a third of them at the σ that few-step schedules visit."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    sig = shift * u / (1 + (shift - 1) * u)
    few = torch.tensor(FEW_STEP_SIGMAS)[torch.randint(len(FEW_STEP_SIGMAS), (n,), generator=gen)]
    pick = torch.rand(n, generator=gen) < 1 / 3
    return torch.where(pick, few, sig)


def train_transformer(
    comps: Components,
    pools: dict[int, Pool],
    sched: Schedule,
    cfg: DemoConfig,
    gen: torch.Generator,
) -> list[nn.Module]:
    text = TextIds(comps)
    encoders: list[nn.Module] = [comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3]
    # Frozen after their pretraining (as SD3 trains), each caption is encoded once.
    trained: list[nn.Module] = [comps.transformer, *(encoders if sched.train_text_encoders else [])]
    for m in encoders:
        m.eval().requires_grad_(False)
    for m in trained:
        m.train().requires_grad_(True)
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if sched.train_text_encoders:
            return encode_text(comps, *text(captions))
        missing = list(dict.fromkeys(c for c in captions if c not in cached))
        if missing:
            with torch.no_grad():
                e, p = encode_text(comps, *text(missing))
            cached.update({c: (e[i], p[i]) for i, c in enumerate(missing)})
        return torch.stack([cached[c][0] for c in captions]), torch.stack([cached[c][1] for c in captions])

    # Weight decay on matrices only: decaying norm scales and biases only slows the start.
    groups = []
    for modules, lr in (([comps.transformer], sched.lr), (trained[1:], sched.text_lr)):
        params = [p for m in modules for p in m.parameters()]
        if not params:
            continue
        groups.append({"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": 0.01})
        groups.append({"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.99))
    base = [g["lr"] for g in opt.param_groups]
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in trained]
    # The resolution of each step: a fixed, shuffled order.
    order: list[int] = []
    for res, (share, _) in sched.mix.items():
        order += [res] * round(share * sched.steps)
    order = (order + [min(sched.mix)] * sched.steps)[: sched.steps]
    perm = torch.randperm(len(order), generator=gen).tolist()
    order = [order[i] for i in perm]
    t0 = time.perf_counter()
    running: dict[int, float] = {}
    for step, res in enumerate(order):
        frac = step / max(1, sched.steps)
        scale = min(1.0, (step + 1) / sched.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g, b in zip(opt.param_groups, base, strict=True):
            g["lr"] = b * scale
        pool = pools[res]
        idx = torch.randint(len(pool.captions), (sched.mix[res][1],), generator=gen)
        x0 = pool.latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = sample_sigmas(len(idx), gen, cfg.shift)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        embeds, pooled = embed([pool.captions[i] for i in idx.tolist()])
        v = comps.transformer(
            hidden_states=xt,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=sigma * 1000,
            return_dict=False,
        )[0]
        if sched.object_weight:
            # The object is a few percent of the picture but most of what the prompt says: weigh its cells up.
            weight = 1.0 + sched.object_weight * pool.coverage[idx]
            loss = (weight * (v - (noise - x0)) ** 2).mean() / weight.mean()
        else:
            loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in trained for p in m.parameters()], 1.0)
        opt.step()
        decay = min(sched.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(trained, ema, strict=True):
                for p, q in zip(m.parameters(), e.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        running[res] = 0.98 * running.get(res, loss.item()) + 0.02 * loss.item()
        if step % 50 == 0 or step == len(order) - 1:
            losses = " ".join(f"{r}:{v:.4f}" for r, v in sorted(running.items()))
            log(
                f"step {step}/{len(order)} lr {opt.param_groups[0]['lr']:.2e} loss {losses} "
                f"({time.perf_counter() - t0:.0f} s)"
            )
    return ema if sched.train_text_encoders else [*ema, *encoders]


def save(comps: Components, cfg: DemoConfig, out: Path) -> None:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=comps.transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift),
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        tokenizer=comps.tokenizer,
        text_encoder_2=comps.text_encoder_2,
        # A fresh one: comps.tokenizer keeps the padding state TextIds set, and saves it (the shipped files differ).
        tokenizer_2=build_tokenizers()[0],
        text_encoder_3=comps.text_encoder_3,
        tokenizer_3=comps.t5_tokenizer,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)


def train(
    out: Path,
    *,
    minutes: float = 50.0,
    seed: int = 0,
    threads: int = 2,
    sched: Schedule | None = None,
    cfg: DemoConfig | None = None,
) -> dict[str, float]:
    # A fixed thread count keeps a rerun bit-identical (the reduction order depends on it), as do the seeds.
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    cfg = cfg or DemoConfig(seed=seed)
    sched = sched or Schedule.for_minutes(minutes)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    comps = build_components(cfg)
    log(f"schedule {asdict(sched)}")
    vae_report = train_vae(comps.vae, sched, rng)
    times["vae"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    check = next(vae_batches(random.Random(54321), 4, 256))
    gap = float((encode_fast(comps.vae, check) - comps.vae.encode(check).latent_dist.mean).abs().max())
    log(f"fast encoder vs full encoder: max difference {gap:.2e}")
    if gap > 1e-3:
        raise RuntimeError(f"the fast latent path differs from the encoder by {gap}")
    pools = {res: encode_pool(comps.vae, res, n, rng) for res, n in sched.pool.items()}
    every = torch.cat([p.latents.transpose(0, 1).reshape(16, -1) for p in pools.values()], dim=1)
    shift_factor = float(every.mean())
    scaling_factor = float(1.0 / every.std())
    comps.vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    for p in pools.values():
        p.latents = (p.latents - shift_factor) * scaling_factor
    log(f"latents: shift_factor {shift_factor:.4f} scaling_factor {scaling_factor:.4f}")
    times["latents"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text_report = pretrain_text_encoders(comps, sched, rng)
    times["text_encoders"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ema = train_transformer(comps, pools, sched, cfg, gen)
    comps.transformer, comps.text_encoder, comps.text_encoder_2, comps.text_encoder_3 = ema
    times["transformer"] = time.perf_counter() - t0

    save(comps, cfg, out)
    times["total"] = time.perf_counter() - t_all
    (out / "training.json").write_text(
        json.dumps(
            {
                "config": asdict(cfg),
                "schedule": asdict(sched),
                "minutes": minutes,
                "threads": threads,
                "seconds": times,
                "vae": vae_report,
                "text_encoders": text_report,
            },
            indent=2,
        )
        + "\n"
    )
    log("times " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=50.0, help="time budget the step counts are scaled to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (the weights depend on it)")
    args = p.parse_args(argv)
    train(args.out, minutes=args.minutes, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
