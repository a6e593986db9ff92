"""Sizes the pipeline runs at and the memory plan counts with: one place for both, torch-free."""

from __future__ import annotations

VAE_TILING_ABOVE = 1536  # pixels a side: "auto" decodes larger images in tiles (2048² in little memory)
MIN_VAE_TILE = 512  # pixels
T5_MAX_LENGTH = 256  # tokens: diffusers' default max_sequence_length, SD3's training window


def t5_window(tokenizer_limit: int | None) -> int:
    """The T5 window a prompt is padded to: diffusers' 256, or the T5 tokenizer's own limit where it is shorter
    (the demo model is trained on 16-token windows; SD3.5's tokenizer says 512). None: the model has no T5
    tokenizer."""
    return T5_MAX_LENGTH if tokenizer_limit is None else min(T5_MAX_LENGTH, tokenizer_limit)
