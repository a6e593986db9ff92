"""Plain image analysis of a demo-world picture: background colour, object colour, shape, position, size.

No learned parts: the background is the commonest palette colour of the border pixels, the object the pixels far
from it, its colour their commonest palette colour, its box robust percentiles of their coordinates, its position
the box centre on a 3×3 grid, and its shape the template (rendered into that box) it overlaps best (IoU).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image

from sd3demo.world import COLOURS, POSITIONS, SHAPES, SIZES, Scene, unit_shape_mask

_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)
_TEMPLATE = 48  # side the shape templates are drawn at
_GRID = 12  # side of the coarse grid that shapes are compared on
_NONE = "none"


@dataclass(frozen=True)
class Verdict:
    background: str
    colour: str
    shape: str
    position: str
    size: str
    object_fraction: float  # share of the pixels that belong to the object

    def matches(self, scene: Scene) -> dict[str, bool]:
        return {
            "background": self.background == scene.background,
            "colour": self.colour == scene.colour,
            "shape": self.shape == scene.shape,
            "position": self.position == scene.position,
            "size": self.size == scene.size,
        }


def _nearest(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each (N, 3) pixel."""
    d = ((pixels[:, None, :] - _PALETTE[None, :, :]) ** 2).sum(-1)
    return d.argmin(1)


@cache
def _templates() -> dict[str, np.ndarray]:
    """Each shape's share of every cell of a _GRID² grid over its box."""
    k = _TEMPLATE // _GRID
    return {s: unit_shape_mask(s, _TEMPLATE).reshape(_GRID, k, _GRID, k).mean(axis=(1, 3)) for s in SHAPES}


def _position_name(col: int, row: int) -> str:
    return next(name for name, cr in POSITIONS.items() if cr == (col, row))


def judge(image: Image.Image) -> Verdict:
    # Work at about 256 px: enough for every attribute and fast at 1024².
    w, h = image.size
    scale = max(1, min(w, h) // 256)
    small = image.convert("RGB").resize((w // scale, h // scale), Image.Resampling.BOX) if scale > 1 else image
    arr = np.asarray(small.convert("RGB"), dtype=np.float32)
    hh, ww, _ = arr.shape
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    bg_idx = int(np.bincount(_nearest(border), minlength=len(_PALETTE)).argmax())
    # Pixels far from the background's actual (median border) colour make the object.
    bg_rgb = np.median(border, axis=0)
    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    mask = dist > 60.0
    frac = float(mask.mean())
    if mask.sum() < max(8, hh * ww // 2000):
        return Verdict(_PALETTE_NAMES[bg_idx], _NONE, _NONE, _NONE, _NONE, frac)
    object_pixels = arr[mask]
    nearest = _nearest(object_pixels)
    votes = np.bincount(nearest, minlength=len(_PALETTE))
    votes[bg_idx] = 0
    colour_idx = int(votes.argmax())
    colour = _PALETTE_NAMES[colour_idx]
    # Each pixel's share of object: where its colour lies between the background's and the object's. A decoder
    # that averages colours over blocks paints an edge block in between, in proportion to the object it covers.
    obj_rgb = np.median(object_pixels[nearest == colour_idx], axis=0)
    span = obj_rgb - bg_rgb
    cover = np.clip(((arr - bg_rgb) @ span) / max(1.0, float(span @ span)), 0.0, 1.0)
    inside = cover > 0.5
    ys, xs = np.nonzero(inside if inside.sum() >= 8 else mask)
    x0, x1 = np.percentile(xs, [0.5, 99.5])
    y0, y1 = np.percentile(ys, [0.5, 99.5])
    x1, y1 = x1 + 1, y1 + 1
    cx, cy = (x0 + x1) / 2 / ww, (y0 + y1) / 2 / hh
    col, row = min(2, int(cx * 3)), min(2, int(cy * 3))
    side = max(x1 - x0, y1 - y0) / min(ww, hh)
    size = min(SIZES, key=lambda k: abs(SIZES[k] - side))
    # Shape: the object's share of each cell of a coarse grid over its box, against each template on the same
    # grid (soft IoU). Coarse, so that a staircase edge (a decoder drawing in 8-pixel blocks) reads as the slope.
    crop = Image.fromarray(cover.astype(np.float32)).crop((int(x0), int(y0), int(np.ceil(x1)), int(np.ceil(y1))))
    obj = np.asarray(crop.resize((_GRID, _GRID), Image.Resampling.BOX), dtype=np.float32)
    best, best_iou = _NONE, -1.0
    for name, tmpl in _templates().items():
        iou = float(np.minimum(obj, tmpl).sum()) / max(1e-6, float(np.maximum(obj, tmpl).sum()))
        if iou > best_iou:
            best, best_iou = name, iou
    return Verdict(_PALETTE_NAMES[bg_idx], colour, best, _position_name(col, row), size, frac)


def striped(image: Image.Image, *, min_contrast: float = 40.0, min_bands: int = 8) -> bool:
    """Whether the background is striped (the demo adapter's style): along the left and right edges, where no
    object reaches, the rows' brightness swings by ``min_contrast`` or more and, cut at its midpoint, makes at least
    ``min_bands`` horizontal bands (light and dark in turn), whatever their width."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32)
    w = arr.shape[1]
    edge = max(1, w // 50)
    profile = np.concatenate([arr[:, :edge], arr[:, w - edge :]], axis=1).mean(axis=(1, 2))  # (h,)
    lo, hi = np.percentile(profile, [5, 95])
    if hi - lo < min_contrast:
        return False
    light = profile > (lo + hi) / 2
    bands = 1 + int(np.count_nonzero(light[1:] != light[:-1]))
    return bands >= min_bands
