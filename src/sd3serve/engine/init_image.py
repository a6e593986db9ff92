"""The start image of an image-to-image job (torch-free: the API layer builds it)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class InitImage:
    """A start image already at the request's output size: RGB, 8 bits a channel, row-major."""

    pixels: bytes = field(repr=False)
    width: int
    height: int
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.pixels) != self.width * self.height * 3:
            raise ValueError(f"{len(self.pixels)} bytes are not a {self.width}x{self.height} RGB image")
        if not self.digest:
            object.__setattr__(self, "digest", hashlib.sha256(self.pixels).hexdigest())

    @classmethod
    def from_array(cls, rgb: np.ndarray) -> InitImage:
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError("an RGB uint8 array (H, W, 3) is needed")
        return cls(pixels=rgb.tobytes(), width=int(rgb.shape[1]), height=int(rgb.shape[0]))
