"""A loaded model and the memory mode it was stored in: what loading produces and the pipeline, acceleration
and the memory plan read (its own module, so none of them imports another for its types)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusion3Pipeline

    from sd3serve.engine.flow import FlowSampling


@dataclass(frozen=True)
class MemoryMode:
    name: str
    transformer: Literal["full", "fp8"]  # weight storage; "full" is the compute dtype (bf16 on CUDA)
    t5: Literal["full", "fp8", "off"]
    offload: Literal["none", "model", "sequential"]
    about: str = ""

    @property
    def fp8(self) -> dict[str, bool]:
        return {"transformer": self.transformer == "fp8", "text_encoder_3": self.t5 == "fp8"}


@dataclass
class LoadedModel:
    """The model's components (kept on a diffusers pipeline object, which also encodes prompts)."""

    pipe: StableDiffusion3Pipeline
    flow: FlowSampling
    device: torch.device
    dtype: torch.dtype
    source: str  # a path, or "embedded demo model (...)"
    # The demo's tokenizers know its lower-case words only: its prompts are normalised before encoding.
    normalise_prompts: bool = False
    memory: MemoryMode | None = None  # weight storage and offload, as set or chosen for a budget (engine/memory.py)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Latent sides must be a multiple of the patch: pixel sizes a multiple of this."""
        return self.vae_scale_factor * int(self.pipe.transformer.config.patch_size)
