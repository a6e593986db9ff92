"""What the engine is asked to do, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from sd3serve.engine.catalogue import SAMPLER_INFO

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

    @property
    def seeds(self) -> list[int]:
        """Image i uses seed + i."""
        return [self.seed + i for i in range(self.batch_size)]

    @property
    def model_calls(self) -> int:
        """Transformer evaluations per image, at most: steps × the sampler's calls per step, twice with guidance."""
        per_step = SAMPLER_INFO[self.sampler].calls_per_step
        calls = self.steps * per_step if per_step is not None else ADAPTIVE_MAX_CALLS
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
