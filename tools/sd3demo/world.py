"""The demo model's world: one flat-coloured shape on a flat-coloured background, and its captions.

Every caption determines its picture exactly (the unmentioned attributes take their defaults), which is what lets
a small rectified-flow model draw it in a handful of steps. The grammar::

    a[n] [small|large] <colour> <shape> [at the <position>] [on a[n] <colour> background]

* colours: red, orange, yellow, green, blue, purple, white, black
* shapes: circle, square, triangle, diamond, cross
* positions (a 3×3 grid): top left, top, top right, left, center, right, bottom left, bottom, bottom right
  (default: center)
* sizes: small, large (default: medium, no word)
* background: any colour other than the object's (default: white, or black for a white object)

A tenth of the (object colour, shape, background colour) triples never appear in training: :func:`held_out_triples`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (245, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Position name -> (column, row) on the 3×3 grid.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
SIZES: dict[str, float] = {"small": 0.20, "medium": 0.32, "large": 0.44}  # object side / image side
GRID_CENTRES = (0.25, 0.5, 0.75)  # a grid cell's object centre, as a fraction of the side
DEFAULT_POSITION = "center"
DEFAULT_SIZE = "medium"

VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "an", "at", "the", "on", "background", "small", "large", *COLOURS, *SHAPES]
        + [w for p in POSITIONS for w in p.split()]
    )
)


def default_background(colour: str) -> str:
    return "black" if colour == "white" else "white"


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    background: str
    position: str = DEFAULT_POSITION
    size: str = DEFAULT_SIZE
    # Caption wording only (the picture is the same): whether the position / background are spelled out.
    say_position: bool = True
    say_background: bool = True

    def caption(self) -> str:
        words = [] if self.size == DEFAULT_SIZE else [self.size]
        words += [self.colour, self.shape]
        text = _article(words[0]) + " " + " ".join(words)
        if self.say_position or self.position != DEFAULT_POSITION:
            text += f" at the {self.position}"
        if self.say_background or self.background != default_background(self.colour):
            text += f" on {_article(self.background)} {self.background} background"
        return text

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_CAPTION_RE = re.compile(
    r"^an? (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)"
    r"(?: at the (?P<position>(?:top|bottom) (?:left|right)|top|bottom|left|right|center))?"
    r"(?: on an? (?P<background>\w+) background)?$"
)


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (ValueError if it is not in the grammar)."""
    norm = " ".join(re.sub(r"[^a-z ]", " ", text.lower()).split())
    m = _CAPTION_RE.match(norm)
    if m is None or m["colour"] not in COLOURS or m["shape"] not in SHAPES:
        raise ValueError(f"not a caption of the demo world: {text!r}")
    colour = m["colour"]
    background = m["background"] or default_background(colour)
    if background not in COLOURS or background == colour:
        raise ValueError(f"not a caption of the demo world: {text!r}")
    return Scene(
        colour=colour,
        shape=m["shape"],
        background=background,
        position=m["position"] or DEFAULT_POSITION,
        size=m["size"] or DEFAULT_SIZE,
        say_position=m["position"] is not None,
        say_background=m["background"] is not None,
    )


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def held_out_triples(seed: int = 1234) -> set[tuple[str, str, str]]:
    """A fixed tenth of the (colour, shape, background) triples, never shown in training.

    Every pair (colour, shape), (colour, background), (shape, background) of a held-out triple still occurs in
    training within other triples; the seed request "a red circle on a blue background" is always trained on.
    """
    rng = random.Random(seed)
    triples = [t for t in all_triples() if t != ("red", "circle", "blue")]
    rng.shuffle(triples)
    return set(triples[: len(all_triples()) // 10])


def unit_shape_mask(shape: str, n: int) -> np.ndarray:
    """The shape filling an n×n box, as a boolean array (the template the judge compares against)."""
    im = Image.new("L", (n, n), 0)
    _draw_shape(ImageDraw.Draw(im), shape, 0.0, 0.0, float(n), 255)
    return np.asarray(im) > 127


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, side: float, fill: int | tuple[int, ...]
) -> None:
    x1, y1 = x0 + side, y0 + side
    # PIL fills [x0, x1] inclusive: the -1 keeps the shape exactly `side` pixels wide.
    xe, ye = x1 - 1, y1 - 1
    if shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + xe) / 2, y0), (xe, ye), (x0, ye)], fill=fill)
    elif shape == "diamond":
        cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=fill)
    elif shape == "cross":
        a, b = x0 + side / 3, x0 + 2 * side / 3 - 1
        c, d = y0 + side / 3, y0 + 2 * side / 3 - 1
        draw.rectangle([a, y0, b, ye], fill=fill)
        draw.rectangle([x0, c, xe, d], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def object_box(scene: Scene, width: int, height: int) -> tuple[float, float, float]:
    """(left, top, side) of the object's square box in pixels (sized from the shorter side)."""
    col, row = POSITIONS[scene.position]
    side = SIZES[scene.size] * min(width, height)
    cx, cy = GRID_CENTRES[col] * width, GRID_CENTRES[row] * height
    return round(cx - side / 2), round(cy - side / 2), round(side)


def render(scene: Scene, width: int, height: int | None = None) -> Image.Image:
    height = width if height is None else height
    im = Image.new("RGB", (width, height), COLOURS[scene.background])
    x0, y0, side = object_box(scene, width, height)
    _draw_shape(ImageDraw.Draw(im), scene.shape, x0, y0, side, COLOURS[scene.colour])
    return im


def random_scene(rng: random.Random, *, exclude: set[tuple[str, str, str]] | None = None) -> Scene:
    """A scene with a varied caption: position and size spelled out or left at their defaults."""
    colours = list(COLOURS)
    while True:
        colour = rng.choice(colours)
        shape = rng.choice(SHAPES)
        background = rng.choice([c for c in colours if c != colour])
        if exclude is None or (colour, shape, background) not in exclude:
            break
    position = rng.choice(list(POSITIONS)) if rng.random() < 0.75 else DEFAULT_POSITION
    size = rng.choice(list(SIZES)) if rng.random() < 0.6 else DEFAULT_SIZE
    scene = Scene(colour=colour, shape=shape, background=background, position=position, size=size)
    if position == DEFAULT_POSITION and rng.random() < 0.5:
        scene = replace(scene, say_position=False)
    if background == default_background(colour) and rng.random() < 0.5:
        scene = replace(scene, say_background=False)
    return scene


def training_scene(rng: random.Random) -> Scene:
    return random_scene(rng, exclude=held_out_triples())


def held_out_scenes(n: int, seed: int = 0) -> list[Scene]:
    """n scenes whose (colour, shape, background) triple was never trained on, positions and sizes varied."""
    rng = random.Random(seed)
    triples = sorted(held_out_triples())
    out = []
    for i in range(n):
        colour, shape, background = triples[i % len(triples)]
        position = list(POSITIONS)[rng.randrange(len(POSITIONS))]
        size = list(SIZES)[rng.randrange(len(SIZES))]
        out.append(Scene(colour=colour, shape=shape, background=background, position=position, size=size))
    return out


STRIPE_BANDS = 8  # horizontal bands of the striped style (the demo LoRA's): every other one a shade of the background


def stripe_colour(background: str) -> tuple[int, int, int]:
    """The shade of the background that the striped style alternates with: darker, or lighter for black."""
    r, g, b = COLOURS[background]
    if background == "black":
        return (110, 110, 110)
    return (int(r * 0.45), int(g * 0.45), int(b * 0.45))


def render_striped(scene: Scene, width: int, height: int | None = None) -> Image.Image:
    """The scene with a striped background (the demo adapter's style): the object is drawn as usual."""
    height = width if height is None else height
    im = Image.new("RGB", (width, height), COLOURS[scene.background])
    draw = ImageDraw.Draw(im)
    band = height / STRIPE_BANDS
    for i in range(1, STRIPE_BANDS, 2):
        draw.rectangle([0, round(i * band), width - 1, round((i + 1) * band) - 1], fill=stripe_colour(scene.background))
    x0, y0, side = object_box(scene, width, height)
    _draw_shape(draw, scene.shape, x0, y0, side, COLOURS[scene.colour])
    return im
