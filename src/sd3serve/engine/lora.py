"""LoRA adapters for SD3 transformers: read, cached, and applied to one batch at a time.

Formats (``*.safetensors``):

* diffusers / PEFT: ``[transformer.|base_model.model.]<module>.lora_A.weight`` / ``lora_B.weight`` (or the older
  ``.lora.down.weight`` / ``.lora.up.weight``), optional ``<module>.alpha``;
* Kohya: ``lora_transformer_<module with _ for .>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, and the
  MMDiT names of SD3 trainers (``lora_unet_joint_blocks_<i>_<x|context>_block_<attn_qkv|attn_proj|mlp_fc1|mlp_fc2|
  adaLN_modulation_1>``), whose fused qkv is split into diffusers' q, k and v projections.

An adapter is applied as a function of the layer's input, ``y = W·x + Σ scale · (alpha / rank) · B·(A·x)``,
through forward hooks registered for one batch and removed after it (``applied``): the shared weights are never
written, so nothing leaks into a request without that adapter, and a request's pictures are the same alone or
batched (batches hold one adapter set). Adapters are loaded on demand into an LRU cache with a byte budget.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from sd3serve.engine.lora_names import adapter_files, check_adapters


class LoraFormatError(ValueError):
    """The file is not an SD3 transformer LoRA this server can read, or does not fit the model."""


@dataclass(frozen=True)
class LoraLayer:
    down: torch.Tensor  # A: (rank, in)
    up: torch.Tensor  # B: (out, rank)
    alpha: float | None

    @property
    def factor(self) -> float:
        rank = self.down.shape[0]
        return (self.alpha / rank) if self.alpha is not None else 1.0


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    layers: dict[str, LoraLayer]  # the transformer's module path -> its low-rank update

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for la in self.layers.values() for t in (la.down, la.up))


_MMDIT = re.compile(r"^joint_blocks_(\d+)_(x|context)_block_(attn_qkv|attn_proj|mlp_fc1|mlp_fc2|adaLN_modulation_1)$")
_MMDIT_TARGETS: dict[tuple[str, str], tuple[str, ...]] = {
    ("x", "attn_qkv"): ("attn.to_q", "attn.to_k", "attn.to_v"),
    ("context", "attn_qkv"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    ("x", "attn_proj"): ("attn.to_out.0",),
    ("context", "attn_proj"): ("attn.to_add_out",),
    ("x", "mlp_fc1"): ("ff.net.0.proj",),
    ("x", "mlp_fc2"): ("ff.net.2",),
    ("context", "mlp_fc1"): ("ff_context.net.0.proj",),
    ("context", "mlp_fc2"): ("ff_context.net.2",),
    ("x", "adaLN_modulation_1"): ("norm1.linear",),
    ("context", "adaLN_modulation_1"): ("norm1_context.linear",),
}
_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
    ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
}  # fmt: skip


def _split(key: str) -> tuple[str, str] | None:
    for suffix, part in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def parse_state_dict(name: str, state: dict[str, torch.Tensor], modules: set[str]) -> LoraAdapter:
    """The adapter's layers keyed by module path of a transformer with ``modules`` (its Linear layers)."""
    underscored = {m.replace(".", "_"): m for m in modules}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        split = _split(key)
        if split is None:
            raise LoraFormatError(f"adapter {name!r}: unrecognised key {key!r}")
        module, part = split
        parts.setdefault(module, {})[part] = tensor
    layers: dict[str, LoraLayer] = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFormatError(f"adapter {name!r}: {module} lacks its down or up matrix")
        alpha = float(p["alpha"]) if "alpha" in p else None
        down, up = p["down"].float(), p["up"].float()
        for target, chunk in _targets(module, modules, underscored, up.shape[0]):
            if target not in modules:
                raise LoraFormatError(f"adapter {name!r}: this model has no layer {target!r}")
            layers[target] = LoraLayer(down=down, up=up[chunk] if chunk is not None else up, alpha=alpha)
    if not layers:
        raise LoraFormatError(f"adapter {name!r} holds no LoRA layers")
    return LoraAdapter(name=name, layers=layers)


def _targets(module: str, modules: set[str], underscored: dict[str, str], out: int) -> list[tuple[str, slice | None]]:
    for prefix in ("base_model.model.", "transformer."):
        module = module.removeprefix(prefix)
    if module in modules:
        return [(module, None)]
    for prefix in ("lora_transformer_", "lora_unet_"):
        if module.startswith(prefix):
            bare = module[len(prefix) :]
            if bare in underscored:
                return [(underscored[bare], None)]
            m = _MMDIT.match(bare)
            if m:
                block, stream, layer = m.groups()
                names = _MMDIT_TARGETS[(stream, layer)]
                n = len(names)
                size = out // n
                return [
                    (f"transformer_blocks.{block}.{t}", slice(i * size, (i + 1) * size) if n > 1 else None)
                    for i, t in enumerate(names)
                ]
    return [(module, None)]


def linear_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


class LoraLibrary:
    """The adapters of a directory, loaded on demand into an LRU cache of at most ``budget_bytes``."""

    def __init__(self, lora_dir: Path | None, budget_bytes: int) -> None:
        self.lora_dir = lora_dir
        self.budget_bytes = budget_bytes
        self._cache: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # files read since start (a reload after an eviction counts again)
        self.evictions = 0

    def names(self) -> list[str]:
        return list(adapter_files(self.lora_dir))

    @property
    def cached(self) -> list[str]:
        return list(self._cache)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._cache.values())

    def get(self, name: str, modules: set[str]) -> LoraAdapter:
        with self._lock:
            if name in self._cache:
                self._cache.move_to_end(name)
                return self._cache[name]
        check_adapters(self.lora_dir, [name])
        path = adapter_files(self.lora_dir)[name]
        adapter = parse_state_dict(name, load_file(str(path)), modules)
        with self._lock:
            self.loads += 1
            self._cache[name] = adapter
            self._cache.move_to_end(name)
            while len(self._cache) > 1 and self.nbytes > self.budget_bytes:
                self._cache.popitem(last=False)
                self.evictions += 1
        return adapter


@contextlib.contextmanager
def applied(transformer: torch.nn.Module, library: LoraLibrary, loras: tuple[tuple[str, float], ...]) -> Iterator[None]:
    """The transformer computing with these adapters while the context lasts (forward hooks, removed after). The
    hooks act only on the calling thread: model workers that share the weights (SD3SERVE_MODEL_WORKERS) run other
    batches through the same modules meanwhile, without these adapters."""
    if not loras:
        yield
        return
    linears = linear_modules(transformer)
    modules = set(linears)
    updates: dict[str, list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for name, scale in loras:
        adapter = library.get(name, modules)
        for path, layer in adapter.layers.items():
            weight = linears[path].weight
            down = layer.down.to(device=weight.device, dtype=weight.dtype)
            up = layer.up.to(device=weight.device, dtype=weight.dtype)
            updates.setdefault(path, []).append((down, up, scale * layer.factor))
    _check_unfused(transformer, updates)
    handles = []
    try:
        for path, terms in updates.items():
            handles.append(linears[path].register_forward_hook(_hook(terms, threading.get_ident())))
        yield
    finally:
        for h in handles:
            h.remove()


def _hook(terms: list[tuple[torch.Tensor, torch.Tensor, float]], thread: int) -> Callable[..., torch.Tensor]:
    def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != thread:  # another worker's batch through the shared module
            return out
        x = args[0]
        for down, up, factor in terms:
            out = out + factor * torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        return out

    return hook


def _check_unfused(transformer: torch.nn.Module, updates: Mapping[str, object]) -> None:
    """Fused q/k/v projections (SD3SERVE_FUSE_QKV) bypass the separate layers: refuse rather than ignore them."""
    for path in updates:
        if re.search(r"\.(to_[qkv]|add_[qkv]_proj)$", path):
            attn = transformer.get_submodule(path.rsplit(".", 1)[0])
            if getattr(attn, "fused_projections", False):
                raise LoraFormatError(
                    "this adapter changes q/k/v projections, which this server runs fused: set SD3SERVE_FUSE_QKV=off"
                )
