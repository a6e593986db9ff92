"""What the engine is asked to do, and what it gives back."""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image


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


@dataclass
class GenerationResult:
    images: list[Image.Image]
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, denoise, decode
    prompt_truncated: bool = False  # the text encoders saw only the start of the prompt
