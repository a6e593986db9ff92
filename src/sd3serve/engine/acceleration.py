"""Speed and memory options, each switchable on its own (settings) and measured by bench/gpu.py.

- ``fuse_qkv``: one projection for Q, K and V (and for the context stream's) in every joint-attention block; the
  separate projections are dropped, so fusing costs no memory.
- ``weights``: fp8 storage (``float8_e4m3fn``) for the transformer and/or T5, computed in the model dtype: each
  layer is cast up just before it runs and back after (diffusers' layerwise casting). Applied at load time, before
  the weights move to the GPU (engine/loading.py), so the bf16 copy never has to fit there.
- ``compile``: ``torch.compile`` per transformer block ("regional": the 38 identical blocks compile once and
  share the code, compile time stays short) or of the whole transformer ("full"); static shapes per request size.
- ``channels_last_vae``: NHWC memory format for the VAE decoder's convolutions (faster cuDNN and oneDNN kernels;
  on the CPU the demo's 1024² decode takes ~0.65x the time, pixels within 1 level of the plain path).
- ``vae_subpixel``: the decoder's upsample-then-convolve layers as transposed convolutions on the coarse grid
  (engine/subpixel.py); the CPU only by default, where convolutions are the decode's cost.
- ``vae_inplace``: the decoder's resnet blocks with SiLU and the residual sum in place (engine/vae_inplace.py;
  bit-identical); the CPU only by default, where the decode is bound by memory traffic.
- ``vae_tiling``: decode in overlapping tiles so that 2048² fits in little memory.
- ``offload``: "model" keeps each component in CPU memory until it runs (accelerate hooks), "sequential" streams
  weights layer by layer (slowest, smallest). CUDA only.
Attention uses PyTorch's SDPA, which picks the fastest available backend (flash / memory-efficient / cuDNN).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

import torch
from diffusers.hooks import apply_layerwise_casting
from diffusers.hooks.layerwise_casting import apply_layerwise_casting_hook
from diffusers.models.attention_processor import Attention

from sd3serve.engine.subpixel import fuse_upsamplers
from sd3serve.engine.vae_inplace import inplace_resnets
from sd3serve.settings import Settings

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

    from sd3serve.engine.model import LoadedModel

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
# Layers kept in the compute dtype under fp8 storage: positional and patch embeddings and the final projections
# (as diffusers' defaults), T5's relative-position bias, and T5's token embedding: transformers reads a model's
# dtype from its first parameter (T5: the embedding), and the SD3 pipeline casts T5's output to that dtype, so an
# fp8 embedding would round every prompt embedding to fp8. Unlike diffusers' defaults, the adaLN modulation layers
# (``norm1.linear``: a third of SD3.5 Large's weights) are stored in fp8 too; normalisation layers themselves are
# never cast (layerwise casting only touches linear, convolution and embedding layers).
FP8_SKIP = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "relative_attention_bias", "shared", "embed_tokens")
T5_FEED_FORWARD = "DenseReluDense"
# The projections that fusing replaces: (separate layers, fused layer).
_FUSED = ((("to_q", "to_k", "to_v"), "to_qkv"), (("add_q_proj", "add_k_proj", "add_v_proj"), "to_added_qkv"))


def wanted(choice: Literal["auto", "on", "off"], device: torch.device, *, cpu: bool = False) -> bool:
    """Whether an option is on: "auto" means on CUDA, and also on the CPU where ``cpu`` says so."""
    return choice == "on" or (choice == "auto" and (device.type == "cuda" or (cpu and device.type == "cpu")))


def is_fused(transformer: torch.nn.Module) -> bool:
    return any(isinstance(m, Attention) and hasattr(m, "to_qkv") for m in transformer.modules())


def fuse_qkv(transformer: torch.nn.Module) -> None:
    """diffusers' ``fuse_qkv_projections``, then drop the separate Q, K, V layers it keeps beside the fused ones
    (SD3.5 Large: 2.5 GiB of duplicates in bf16); the fused attention processor never reads them."""
    transformer.fuse_qkv_projections()  # type: ignore[operator]
    transformer.original_attn_processors = None  # type: ignore[assignment]  # unfusing is not supported once the originals are gone
    for module in transformer.modules():
        if not isinstance(module, Attention):
            continue
        for separate, fused in _FUSED:
            if hasattr(module, fused):
                for name in separate:
                    if hasattr(module, name):
                        delattr(module, name)


def store_in_fp8(module: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Keep ``module``'s linear, convolution and embedding weights in float8_e4m3fn, computed in ``compute_dtype``
    (each layer is cast up for its own forward and back after it), except the layers of ``FP8_SKIP``.

    T5's feed-forward blocks are cast as a whole: they cast their input to ``wo``'s dtype before calling it, which
    per layer would be fp8."""
    module.to(compute_dtype)
    for name, block in module.named_modules():
        if name.endswith(T5_FEED_FORWARD):
            apply_layerwise_casting_hook(block, FP8, compute_dtype, non_blocking=False)
    skip = (*FP8_SKIP, T5_FEED_FORWARD)
    apply_layerwise_casting(module, storage_dtype=FP8, compute_dtype=compute_dtype, skip_modules_pattern=skip)


def fp8_groups(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that store_in_fp8 casts as one (each is cast up whole while it runs)."""
    groups = []
    for m in module.modules():
        hooks: Any = getattr(m, "_diffusers_hook", None)
        if hooks is not None and hooks.get_hook("layerwise_casting") is not None:
            groups.append(m)
    return groups


def prepare_weights(
    pipe: StableDiffusion3Pipeline, *, fuse: bool, fp8_transformer: bool, fp8_t5: bool, compute_dtype: torch.dtype
) -> list[str]:
    """What has to happen to the weights before they move to the device: fusing (which makes new layers), then fp8
    storage (which must see the fused layers). Returns what was done, for the log."""
    done = []
    if fuse and not is_fused(pipe.transformer):
        fuse_qkv(pipe.transformer)
        done.append("fused QKV")
    if fp8_transformer:
        store_in_fp8(pipe.transformer, compute_dtype)
        done.append("fp8 transformer weights")
    if fp8_t5 and pipe.text_encoder_3 is not None:
        store_in_fp8(pipe.text_encoder_3, compute_dtype)
        done.append("fp8 T5 weights")
    return done


def apply_acceleration(model: LoadedModel, settings: Settings) -> list[str]:
    """Apply the options to the loaded model in place; returns what was turned on, for the log."""
    pipe, device, applied = model.pipe, model.device, []
    if wanted(settings.fuse_qkv, device) or is_fused(pipe.transformer):
        if not is_fused(pipe.transformer):
            fuse_qkv(pipe.transformer)
        applied.append("fused QKV")
    if model.memory is not None:
        applied += [f"fp8 {part} weights" for part, on in (("transformer", model.memory.transformer == "fp8"),
                    ("T5", model.memory.t5 == "fp8" and pipe.text_encoder_3 is not None)) if on]  # fmt: skip
    if settings.vae_subpixel == "on" or (settings.vae_subpixel == "auto" and device.type == "cpu"):
        fused = fuse_upsamplers(pipe.vae.decoder)
        if fused:
            applied.append(f"sub-pixel VAE upsampling ({fused} layers)")
    if settings.vae_inplace == "on" or (settings.vae_inplace == "auto" and device.type == "cpu"):
        replaced = inplace_resnets(pipe.vae.decoder)
        if replaced:
            applied.append(f"in-place VAE resnet blocks ({replaced})")
    if wanted(settings.channels_last_vae, device, cpu=True):
        pipe.vae.to(memory_format=torch.channels_last)
        applied.append("channels-last VAE")
    if settings.vae_tiling != "off":
        applied.append(f"VAE tiling ({settings.vae_tiling}; the pipeline switches it per size)")
    # fp8 storage casts weights in forward hooks, which break the graph: compile around them.
    fullgraph = model.memory is None or model.memory.transformer != "fp8"
    if settings.compile == "regional":
        for block in pipe.transformer.transformer_blocks:
            block.compile(fullgraph=fullgraph, dynamic=False)
        applied.append("torch.compile (regional)")
    elif settings.compile == "full":
        pipe.transformer.compile(fullgraph=fullgraph, dynamic=False)
        applied.append("torch.compile (full)")
    offload = model.memory.offload if model.memory is not None else settings.offload
    if offload != "none":
        if device.type != "cuda":
            raise ValueError("offload needs a CUDA device: on the CPU every component already lives in memory")
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        else:
            pipe.enable_sequential_cpu_offload(device=device)
        applied.append(f"{offload} CPU offload")
    if applied:
        log.info("acceleration: %s", ", ".join(applied))
    return applied
