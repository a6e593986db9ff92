"""What the engine is asked to do, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from sd3serve.catalogue import SAMPLER_INFO

if TYPE_CHECKING:
    from sd3serve.engine.init_image import InitImage

ADAPTIVE_MAX_CALLS = 120  # dpm_adaptive's cap on model calls per image (engine/samplers.py, max_nfe)


@dataclass(frozen=True)
class GenerationJob:
    """One validated request: sizes already final (rounded, presets applied), seed already resolved."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    seed: int
    sampler: str
    scheduler: str
    width: int
    height: int
    batch_size: int
    # Image-to-image: the start image (at width x height) and how much of the schedule runs (ComfyUI's denoise).
    init: InitImage | None = None
    strength: float = 1.0
    # LoRA adapters, (name, scale) in request order; part of the batching key.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def steps_run(self) -> int:
        """Model steps run: ``steps``, or none for an image-to-image request of strength 0."""
        return 0 if self.init is not None and self.strength <= 0.0 else self.steps

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i."""
        return [self.seed + i for i in range(self.batch_size)]

    @property
    def model_calls(self) -> int:
        """Transformer evaluations per image, at most: steps × the sampler's calls per step, twice with guidance."""
        per_step = SAMPLER_INFO[self.sampler].calls_per_step
        calls = self.steps_run * per_step if per_step is not None else ADAPTIVE_MAX_CALLS
        if self.steps_run == 0:
            return 0
        return calls * (2 if self.guidance_scale > 1 else 1)

    @property
    def work(self) -> float:
        """What the request costs the model, in megapixel model evaluations (the ``max_request_work`` unit)."""
        return self.width * self.height / 1e6 * self.batch_size * self.model_calls


@dataclass
class GenerationResult:
    images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, denoise, decode
    prompt_truncated: bool = False  # the text encoders saw only the start of the prompt
