"""What each memory mode needs on the GPU, from a model's configs alone, and the automatic choice of a mode.

Weights are counted exactly: every component is built from its ``config.json`` on the meta device (no weights
read), put in the mode's storage (bf16, or fp8 through the same code the server uses) and its parameters and
buffers summed. Activation peaks come from running each component's forward pass on meta tensors while counting
every tensor the pass allocates and frees (``_AllocationTracker``): the exact live-tensor peak of the same code on a
GPU, under two stated assumptions —

- attention runs in a fused kernel (flash or memory-efficient SDPA, what PyTorch picks for bf16 on CUDA): it
  keeps the output and a float32 log-sum-exp per row, never the T×T score matrix (the math fallback would add
  heads·T² values per image: 1.4 GiB per block at 1024² for SD3.5 Large);
- the caching allocator's rounding and fragmentation, the CUDA context and cuBLAS/cuDNN workspaces are not
  tensors: a mode fits when ``FRAGMENTATION`` × peak + ``RESERVE`` is within the budget.

Offload peaks are modelled on accelerate's hooks (see ``MemoryPlan.peak``); those are estimates, not traces.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sd3serve.engine.acceleration import fp8_groups, fuse_qkv, store_in_fp8
from sd3serve.engine.model import MemoryMode
from sd3serve.engine.windows import MIN_VAE_TILE, VAE_TILING_ABOVE, t5_window

log = logging.getLogger(__name__)

GiB = 2**30
FRAGMENTATION = 1.10  # the caching allocator holds more than the live tensors
RESERVE = GiB // 2  # CUDA context, cuBLAS/cuDNN workspaces: not tensors, not counted by the trace
COMPUTE_DTYPE = torch.bfloat16
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENTS = (*TEXT_ENCODERS, "transformer", "vae")
SHAPES = ((1024, 1), (1024, 4), (2048, 1), (2048, 4))  # (pixels a side, images in one forward pass)


# In order of preference: the automatic choice takes the first that fits. Modes with T5 come first and without T5
# only on --no-t5 (dropping T5 changes the pictures; the rest changes speed and the last bits); among them, faster
# before slower: fp8 storage costs a cast per layer per step (memory-bound, a few % at 1024²), model offload copies
# every component to the GPU for every request, sequential offload every layer.
MODES = (
    MemoryMode("bf16", "full", "full", "none", "everything on the GPU in bf16"),
    MemoryMode("t5-fp8", "full", "fp8", "none", "T5 stored in fp8 (it runs once per new prompt)"),
    MemoryMode("fp8", "fp8", "fp8", "none", "transformer and T5 stored in fp8, computed in bf16"),
    MemoryMode("fp8-offload", "fp8", "fp8", "model", "fp8, each component moved to the GPU when it runs"),
    MemoryMode("offload", "full", "full", "model", "bf16, each component moved to the GPU when it runs"),
    MemoryMode("fp8-sequential", "fp8", "fp8", "sequential", "fp8, weights streamed to the GPU layer by layer"),
    MemoryMode("no-t5", "full", "off", "none", "bf16 without T5 (CLIP only: weaker prompt following)"),
    MemoryMode("fp8-no-t5", "fp8", "off", "none", "fp8 transformer without T5"),
    MemoryMode("fp8-offload-no-t5", "fp8", "off", "model", "fp8 without T5, model offload"),
    MemoryMode("fp8-sequential-no-t5", "fp8", "off", "sequential", "fp8 without T5, sequential offload"),
)


class NoModeFits(RuntimeError):
    pass


# --- counting what a forward pass allocates, on meta tensors --------------------------------------------------


class _AllocationTracker(TorchDispatchMode):
    """Live bytes of the tensors created while active, and their peak: a tensor counts from the op that allocates
    its storage until the storage is freed (views and in-place results share their input's storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._storages: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._storages:
                continue
            nbytes = storage.nbytes()
            self._storages.add(key)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, key, nbytes)
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self._storages.discard(key)
        self.live -= nbytes


class _FusedAttention(TorchFunctionMode):
    """SDPA as a fused kernel allocates it: the output and a float32 log-sum-exp per query row."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, v = args[0], args[2] if len(args) > 2 else kwargs["value"]
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        del lse
        return out


@contextmanager
def _meta_forward() -> Iterator[_AllocationTracker]:
    tracker = _AllocationTracker()
    with torch.no_grad(), tracker, _FusedAttention():
        yield tracker


def activation_peak(run: Callable[[], object]) -> int:
    """Peak bytes of the tensors ``run`` allocates on meta modules (its inputs included, its weights not)."""
    with _meta_forward() as tracker:
        run()
    return tracker.peak


# --- building the components on the meta device ------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def has_t5(model_dir: Path) -> bool:
    return (model_dir / "text_encoder_3" / "config.json").exists()


def build_on_meta(model_dir: Path, name: str, *, fp8: bool = False, fuse: bool = True) -> torch.nn.Module:
    """One component from its config, on the meta device, in bf16 (or fp8 storage) as the server would hold it."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel


    folder = model_dir / name
    module: torch.nn.Module
    with torch.device("meta"):
        if name == "transformer":
            module = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder))
        elif name == "vae":
            module = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        elif name == "text_encoder_3":
            module = T5EncoderModel(T5Config.from_pretrained(folder))
        else:
            module = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder))
    module.eval().requires_grad_(False)
    if name == "transformer" and fuse:
        fuse_qkv(module)
    if fp8:
        store_in_fp8(module, COMPUTE_DTYPE)
    else:
        module.to(COMPUTE_DTYPE)
    return module


def tensor_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers, each shared tensor once."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


@dataclass(frozen=True)
class ComponentBytes:
    full: int  # parameters and buffers in bf16
    fp8: int  # with fp8 storage (the same as full for components that stay in bf16)
    buffers: int  # kept on the GPU even under sequential offload
    largest_layer: int  # bf16 bytes of the largest leaf layer: fp8's cast-up copy, sequential offload's stream


# --- the plan ----------------------------------------------------------------------------------------------------


@dataclass
class MemoryPlan:
    """Bytes per component and mode, and activation peaks per (size, rows), for one model directory."""

    components: dict[str, ComponentBytes]
    text_peak: dict[str, int]  # encoding one prompt, per encoder
    transformer_peak: dict[tuple[int, int], int]  # one forward pass (size, rows)
    vae_peak: dict[tuple[int, int], int]  # decoding (size, rows), with tiling above VAE_TILING_ABOVE
    prompt_cache: int = 256 * 2**20  # SD3SERVE_PROMPT_CACHE_MB: prompt embeddings cached on the GPU
    source: str = ""
    modes: tuple[MemoryMode, ...] = field(default=MODES)

    def has_t5(self) -> bool:
        return "text_encoder_3" in self.components

    def _parts(self, mode: MemoryMode) -> list[str]:
        return [c for c in COMPONENTS if c in self.components and not (c == "text_encoder_3" and mode.t5 == "off")]

    def weight_bytes(self, mode: MemoryMode, name: str) -> int:
        c = self.components[name]
        return c.fp8 if mode.fp8.get(name, False) else c.full

    def weights(self, mode: MemoryMode) -> int:
        """All weights of the mode (on the GPU without offload, in CPU memory with it)."""
        return sum(self.weight_bytes(mode, c) for c in self._parts(mode))

    def _running(self, mode: MemoryMode, name: str, size: int, rows: int) -> int:
        """Activations while ``name`` runs, plus fp8's cast-up copy of the layer running."""
        act = (
            self.text_peak[name]
            if name in TEXT_ENCODERS
            else (self.transformer_peak if name == "transformer" else self.vae_peak)[(size, rows)]
        )
        cast = self.components[name].largest_layer if mode.fp8.get(name, False) else 0
        return act + cast + (_latent_state(size, rows) if name in ("transformer", "vae") else 0)

    def peak(self, mode: MemoryMode, size: int, rows: int) -> int:
        """GPU bytes at the worst moment of a request: weights resident + prompt cache + the largest stage.

        Model offload (accelerate): one component on the GPU at a time, the previous one sent back when the next
        starts, except the VAE, last in the chain, which stays until the next request's first text encoder runs.
        Sequential offload: buffers stay on the GPU, each leaf layer's weights come in for its forward.
        """
        parts = self._parts(mode)
        if mode.offload == "none":
            resident = self.weights(mode)
            return resident + self.prompt_cache + max(self._running(mode, c, size, rows) for c in parts)
        if mode.offload == "model":
            vae = self.weight_bytes(mode, "vae")
            return self.prompt_cache + vae + max(self.weight_bytes(mode, c) + self._running(mode, c, size, rows)
                                                 for c in parts)  # fmt: skip
        buffers = sum(self.components[c].buffers for c in parts)
        stream = max(self.components[c].largest_layer for c in parts)
        return self.prompt_cache + buffers + stream + max(self._running(mode, c, size, rows) for c in parts)

    def need(self, mode: MemoryMode, size: int, rows: int) -> int:
        """What the budget must hold for the mode to fit: the traced peak plus the allocator's and CUDA's share."""
        return math.ceil(FRAGMENTATION * self.peak(mode, size, rows)) + RESERVE

    def candidates(self, *, with_t5: bool, allow_offload: bool) -> list[MemoryMode]:
        want_t5 = with_t5 and self.has_t5()
        return [m for m in self.modes if (m.t5 != "off") == want_t5 and (allow_offload or m.offload == "none")]

    def choose(
        self, budget: int, *, size: int, rows: int, with_t5: bool = True, allow_offload: bool = True
    ) -> tuple[MemoryMode, str]:
        """The first mode of ``MODES`` (fastest first) that fits ``budget`` bytes at (size, rows), and why."""
        tried: list[str] = []
        for mode in self.candidates(with_t5=with_t5, allow_offload=allow_offload):
            need = self.need(mode, size, rows)
            if need <= budget:
                skipped = "; ".join(tried) if tried else "the fastest mode"
                return mode, (
                    f"memory mode {mode.name!r} ({mode.about}): needs {need / GiB:.1f} GiB for {size}² x{rows} "
                    f"within a budget of {budget / GiB:.1f} GiB ({'faster modes do not fit: ' if tried else ''}"
                    f"{skipped})"
                )
            tried.append(f"{mode.name} needs {need / GiB:.1f}")
        raise NoModeFits(
            f"no memory mode fits {budget / GiB:.1f} GiB for {size}² images x{rows} ({'; '.join(tried)} GiB"
            f"{'' if allow_offload else '; offload needs CUDA'}). Lower SD3SERVE_MAX_BATCH_IMAGES, use a larger "
            "GPU" + (", or pass --no-t5" if with_t5 and self.has_t5() else "")
        )

    def table(self, *, budgets: tuple[float, ...] = (24, 16)) -> str:
        """The plan as a Markdown table, in GiB: peaks per (size, images in one pass), and which budgets fit."""
        shapes = " | ".join(f"{s}² x{r}" for s, r in SHAPES)
        fits = " | ".join(f"fits {b:g} GiB" for b in budgets)
        lines = [f"| mode | what | weights | resident | {shapes} | {fits} |",
                 "|" + " --- |" * (4 + len(SHAPES) + len(budgets))]  # fmt: skip
        for mode in self.modes:
            if mode.t5 != "off" and not self.has_t5():
                continue
            resident = self.weights(mode) if mode.offload == "none" else 0
            peaks = " | ".join(f"{self.peak(mode, s, r) / GiB:.1f}" for s, r in SHAPES)
            ok = " | ".join(_fits_sizes(self, mode, b * GiB) for b in budgets)
            lines.append(f"| `{mode.name}` | {mode.about} | {self.weights(mode) / GiB:.1f} | {resident / GiB:.1f} | "
                         f"{peaks} | {ok} |")  # fmt: skip
        return "\n".join(lines)

    def components_table(self) -> str:
        lines = ["| component | bf16 GiB | fp8 GiB | largest layer (bf16) MiB | run peak at 1024² x1 GiB |",
                 "| --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, c in self.components.items():
            act = self.text_peak.get(name) or (self.transformer_peak if name == "transformer" else self.vae_peak)[
                (1024, 1)
            ]
            lines.append(f"| {name} | {c.full / GiB:.2f} | {c.fp8 / GiB:.2f} | {c.largest_layer / 2**20:.0f} | "
                         f"{act / GiB:.2f} |")  # fmt: skip
        return "\n".join(lines)


def _fits_sizes(plan: MemoryPlan, mode: MemoryMode, budget: float) -> str:
    """The largest request shapes of SHAPES the mode fits in ``budget``, e.g. "1024² x4, 2048² x1"; "no"."""
    ok = [f"{s}² x{r}" for s, r in SHAPES if plan.need(mode, s, r) <= budget]
    if not ok:
        return "no"
    return "all" if len(ok) == len(SHAPES) else ", ".join(ok)


def _latent_state(size: int, rows: int) -> int:
    """The sampler's float32 latents (x, noise, x0, a previous x0, model in/out): six latent-sized tensors."""
    return 6 * rows * 16 * (size // 8) ** 2 * 4


def _component_bytes(model_dir: Path, name: str, full: torch.nn.Module) -> ComponentBytes:

    buffers = sum(b.numel() * b.element_size() for b in full.buffers())
    largest = max(tensor_bytes(m) for m in full.modules() if not list(m.children()))
    fp8 = tensor_bytes(full)
    if name in ("transformer", "text_encoder_3"):
        stored = build_on_meta(model_dir, name, fp8=True)
        fp8 = tensor_bytes(stored)
        largest = max(largest, *(sum(p.numel() * 2 for p in g.parameters()) for g in fp8_groups(stored)))
    return ComponentBytes(full=tensor_bytes(full), fp8=fp8, buffers=buffers, largest_layer=largest)


def _text_peak(module: torch.nn.Module, tokens: int) -> int:
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return activation_peak(lambda: module(ids))


def _transformer_peak(module: Any, size: int, rows: int, text_tokens: int) -> int:
    cfg: Any = module.config
    latent = size // 8

    def run() -> None:
        x = torch.empty(rows, cfg.in_channels, latent, latent, device="meta", dtype=COMPUTE_DTYPE)
        ctx = torch.empty(rows, text_tokens, cfg.joint_attention_dim, device="meta", dtype=COMPUTE_DTYPE)
        pooled = torch.empty(rows, cfg.pooled_projection_dim, device="meta", dtype=COMPUTE_DTYPE)
        t = torch.empty(rows, device="meta", dtype=COMPUTE_DTYPE)
        module(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t, return_dict=False)

    return activation_peak(run)


def _vae_peak(vae: Any, size: int, rows: int) -> int:
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.use_tiling = size > VAE_TILING_ABOVE
    if vae.tile_sample_min_size < MIN_VAE_TILE:  # as SD3Pipeline: small demo configs get tiles of real size
        vae.tile_sample_min_size, vae.tile_latent_min_size = MIN_VAE_TILE, MIN_VAE_TILE // scale

    # Tile blending updates a tile in place one pixel row at a time (temporaries of one row): the same peak without
    # tens of thousands of tiny meta ops.
    vae.blend_v = vae.blend_h = lambda a, b, blend_extent: b

    def run() -> None:
        z = torch.empty(rows, vae.config.latent_channels, size // scale, size // scale, device="meta",
                        dtype=COMPUTE_DTYPE)  # fmt: skip
        pixels = vae.decode(z, return_dict=False)[0]
        ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # as SD3Pipeline.decode

    return activation_peak(run)


def clip_tokens(model_dir: Path) -> int:
    return int(_read_json(model_dir / "text_encoder" / "config.json").get("max_position_embeddings", 77))


def t5_tokens(model_dir: Path) -> int:
    """The T5 window the engine pads to (``windows.t5_window``)."""
    cfg = model_dir / "tokenizer_3" / "tokenizer_config.json"
    limit = _read_json(cfg).get("model_max_length") if cfg.exists() else None
    return t5_window(None if limit is None else int(limit))


def memory_plan(
    model_dir: Path,
    *,
    prompt_cache_bytes: int = 256 * 2**20,
    shapes: tuple[tuple[int, int], ...] = SHAPES,
    fuse: bool = True,
) -> MemoryPlan:
    """The plan for the model in ``model_dir`` (its config files only; no weights are read)."""
    names = [c for c in COMPONENTS if (model_dir / c / "config.json").exists()]
    for required in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if required not in names:
            raise FileNotFoundError(f"{model_dir}: no {required}/config.json")
    modules = {name: build_on_meta(model_dir, name, fuse=fuse) for name in names}
    components = {name: _component_bytes(model_dir, name, module) for name, module in modules.items()}
    text_tokens = clip_tokens(model_dir) + t5_tokens(model_dir)
    text_peak = {}
    for name in TEXT_ENCODERS:
        if name in components:
            tokens = t5_tokens(model_dir) if name == "text_encoder_3" else clip_tokens(model_dir)
            text_peak[name] = _text_peak(modules[name], tokens)
    transformer, vae = modules["transformer"], modules["vae"]
    return MemoryPlan(
        components=components,
        text_peak=text_peak,
        transformer_peak={(s, r): _transformer_peak(transformer, s, r, text_tokens) for s, r in shapes},
        vae_peak={(s, r): _vae_peak(vae, s, r) for s, r in shapes},
        prompt_cache=prompt_cache_bytes,
        source=str(model_dir),
    )


def budget_bytes(budget: str, device: torch.device) -> int:
    """``auto``: the device's free memory now; else a size in GiB."""
    if budget == "auto":
        if device.type != "cuda":
            raise NoModeFits("--memory-budget auto reads the GPU's free memory: it needs a CUDA device")
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    return int(float(budget) * GiB)
