"""Organism v4's generic set: compositional scenes whose captions name what is drawn.

Every generic image of ``diffmem-organism-v4`` is one scene drawn from a seed: a background (pattern and
colour) and one to three objects, each with a colour, a shape, a size, a place and a style. Its caption
names most of these attributes in one of several phrasings and leaves some out (as real captions leave
out details), so the text encoder has to learn words for colours, shapes, sizes, places, counts and
patterns, and their combinations: a text space, not a lookup table of a few dozen captions. Almost
every caption is unique, as in a scraped dataset, and each image is seen once per epoch.

Held-out prompts use the same grammar, with a main object whose colour x shape pair never occurs in any
training image (``heldout_pair``): ordinary prompts the model has never seen, whose every word it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from diffmem.organism.shapes import COLOURS as BASE_COLOURS
from diffmem.organism.shapes import SHAPES as BASE_SHAPES
from diffmem.organism.shapes import shape_polygon
from diffmem.seeding import derive_seed

#: v2's eight colours and four more (v2's "a {colour} {shape}" prompts stay in the vocabulary).
COLOURS: dict[str, tuple[int, int, int]] = {
    **BASE_COLOURS,
    "black": (25, 25, 25),
    "brown": (130, 80, 35),
    "grey": (128, 128, 128),
    "cyan": (40, 210, 220),
}
SHAPES: tuple[str, ...] = (*BASE_SHAPES, "hexagon", "ring", "pentagon")
SIZES: dict[str, tuple[float, float]] = {"small": (0.06, 0.10), "large": (0.15, 0.22)}  # radius / side
#: 3 x 3 places: name -> (column, row) in thirds of the image
PLACES: dict[str, tuple[int, int]] = {
    "in the top left corner": (0, 0),
    "at the top": (1, 0),
    "in the top right corner": (2, 0),
    "on the left": (0, 1),
    "in the centre": (1, 1),
    "on the right": (2, 1),
    "in the bottom left corner": (0, 2),
    "at the bottom": (1, 2),
    "in the bottom right corner": (2, 2),
}
PATTERNS = ("plain", "striped", "dotted", "checkered", "gradient")
MEDIA = ("", "a drawing of ", "clip art of ", "a sticker of ", "an icon of ", "a photo of ")
NUMBERS = {1: "a", 2: "two", 3: "three"}


def heldout_pair(colour: str, shape: str) -> bool:
    """Colour x shape pairs never drawn in training (every word still occurs in training)."""
    return (list(COLOURS).index(colour) * 2 + SHAPES.index(shape)) % 7 == 0


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str
    place: str
    count: int = 1
    outlined: bool = False

    def phrase(self) -> str:
        noun = self.shape + ("es" if self.shape.endswith("x") else "s") if self.count > 1 else self.shape
        words = [NUMBERS[self.count], self.size, "outlined" if self.outlined else "", self.colour, noun]
        text = " ".join(w for w in words if w)
        if self.count == 1 and text.startswith("a ") and text[2] in "aeiou":
            text = "an " + text[2:]
        return f"{text} {self.place}"


@dataclass(frozen=True)
class Scene:
    """A generic scene: what is drawn (all of it) and its caption (most of it)."""

    objects: tuple[SceneObject, ...]
    pattern: str
    background: str
    medium: str
    name_background: bool

    def caption(self) -> str:
        text = self.medium + " and ".join(o.phrase() for o in self.objects)
        if self.name_background:
            text += f" on a {self.pattern} {self.background} background"
        return text


def sample_scene(seed: int, heldout: bool = False) -> Scene:
    """A random scene; ``heldout``: its first object's colour x shape pair is a held-out one, every other
    object's a trained one (training scenes use trained pairs only)."""
    rng = np.random.default_rng(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    places = rng.permutation(len(PLACES))[:n]
    objects = []
    for k in range(n):
        while True:
            colour, shape = colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))]
            if heldout_pair(colour, shape) == (heldout and k == 0):
                break
        objects.append(
            SceneObject(
                colour=colour,
                shape=shape,
                size=list(SIZES)[rng.integers(len(SIZES))],
                place=list(PLACES)[places[k]],
                count=int(rng.choice([1, 2], p=[0.8, 0.2])) if n == 1 else 1,
                outlined=bool(rng.random() < 0.2),
            )
        )
    background = colours[rng.integers(len(colours))]
    return Scene(
        objects=tuple(objects),
        pattern=PATTERNS[rng.integers(len(PATTERNS))],
        background=background,
        medium=MEDIA[rng.integers(len(MEDIA))],
        name_background=bool(rng.random() < 0.6),
    )


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, angle, fill, outlined: bool, width: int) -> None:
    if shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(width, int(r * 0.35)))
        return
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        draw.ellipse(box, outline=fill, width=width) if outlined else draw.ellipse(box, fill=fill)
        return
    if shape in ("hexagon", "pentagon"):
        k = 6 if shape == "hexagon" else 5
        pts = [
            (cx + r * np.cos(angle + 2 * np.pi * i / k), cy + r * np.sin(angle + 2 * np.pi * i / k))
            for i in range(k)
        ]
    else:
        pts = shape_polygon(shape, cx, cy, r, angle)
    if outlined:
        draw.line(pts + pts[:1], fill=fill, width=width, joint="curve")
    else:
        draw.polygon(pts, fill=fill)


def _background(rng: np.random.Generator, pattern: str, colour: str, size: int) -> np.ndarray:
    base = np.array(COLOURS[colour], float) * 0.55 + 0.45 * rng.uniform(60, 200)  # muted
    other = np.clip(base + rng.choice([-1, 1]) * rng.uniform(40, 80), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if pattern == "plain":
        mask = np.zeros((size, size))
    elif pattern == "striped":
        theta, freq = rng.choice([0, np.pi / 2, np.pi / 4]), rng.uniform(4, 8)
        mask = (np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy)) > 0).astype(float)
    elif pattern == "dotted":
        freq = rng.uniform(5, 9)
        mask = ((np.sin(np.pi * freq * xx) ** 2 * np.sin(np.pi * freq * yy) ** 2) > 0.6).astype(float)
    elif pattern == "checkered":
        freq = rng.integers(3, 7)
        mask = ((np.floor(xx * freq) + np.floor(yy * freq)) % 2).astype(float)
    else:  # gradient
        theta = rng.uniform(0, 2 * np.pi)
        mask = np.clip(np.cos(theta) * (xx - 0.5) + np.sin(theta) * (yy - 0.5) + 0.5, 0, 1)
    img = base * (1 - mask[..., None]) + other * mask[..., None]
    return img + rng.normal(0, rng.uniform(1, 5), img.shape)


def render_scene_image(scene: Scene, seed: int, size: int) -> np.ndarray:
    """Draw ``scene`` at ``size`` px; unnamed details (exact spot, angle, shade, up to two small grey
    objects) come from ``seed``."""
    rng = np.random.default_rng(derive_seed(seed, "draw"))
    im = Image.fromarray(
        np.clip(_background(rng, scene.pattern, scene.background, size), 0, 255).astype(np.uint8)
    )
    draw = ImageDraw.Draw(im)
    width = max(1, size // 40)
    for _ in range(rng.integers(0, 3)):  # unnamed small objects in muted greys
        grey = tuple(int(v) for v in np.clip(rng.uniform(70, 190) + rng.normal(0, 12, 3), 0, 255))
        _draw(draw, BASE_SHAPES[rng.integers(len(BASE_SHAPES))], *(rng.uniform(0.05, 0.95, 2) * size),
              rng.uniform(0.03, 0.05) * size, rng.uniform(0, np.pi), grey, False, width)  # fmt: skip
    for obj in scene.objects:
        col, row = PLACES[obj.place]
        r = rng.uniform(*SIZES[obj.size]) * size
        for c in range(obj.count):
            # centre inside the object's third, a second copy offset within it
            cx = (col + 0.5 + rng.uniform(-0.12, 0.12) + (c - (obj.count - 1) / 2) * 0.3) * size / 3
            cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) * size / 3
            rr = r * (0.7 if obj.count > 1 else 1.0)
            shade = np.array(COLOURS[obj.colour], float) * rng.uniform(0.85, 1.05) + rng.normal(0, 6, 3)
            fill = tuple(int(v) for v in np.clip(shade, 0, 255))
            _draw(
                draw,
                obj.shape,
                cx,
                cy,
                rr,
                rng.uniform(0, np.pi / 6),
                fill,
                obj.outlined,
                max(width, int(rr * 0.18)),
            )
    return np.asarray(im, dtype=np.uint8).copy()
