"""SolidMark keys and keyed images: seeded uniform keys, 8-bit frame values, border and centre patterns.

Kriplani et al. (arXiv:2503.00592) give every training image a scalar key ``k ~ U[0, 1)`` shared by
all channels and draw it as a solid frame of ``width`` pixels padded around the image (``border``,
the default, image grows by ``2 * width``) or as a centred ``width x width`` square written over it
(``center``). A key is drawn from (seed, key id) alone, so it does not depend on the order or the
batch in which images are keyed.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from diffmem.scores.solidmark import (
    ValueSpace,
    center_mask,
    check_value_space,
    frame_mask,
    pixel_to_space,
    space_to_pixel,
)
from diffmem.seeding import derive_seed

Pattern = Literal["border", "center"]
PATTERNS: tuple[str, ...] = ("border", "center")

#: Default frame width in pixels (the paper's SD and DDPM runs).
DEFAULT_FRAME_WIDTH = 16
#: Default key seed (the paper's).
DEFAULT_SEED = 42
#: Grey levels of an 8-bit image.
LEVELS = 255


def draw_key(seed: int, key_id: str) -> float:
    """A key ``k ~ U[0, 1)`` determined by ``(seed, key_id)``: the top 53 bits of ``derive_seed`` over ``2**53``."""
    return (derive_seed(seed, "solidmark-key", key_id) >> 10) / float(1 << 53)


def frame_level(key: float, space: ValueSpace) -> int:
    """The 8-bit grey level that draws ``key`` of ``space``: ``round(255 * pixel(k))``."""
    if not 0.0 <= key < 1.0:
        raise ValueError(f"key {key!r} is outside [0, 1)")
    return int(round(LEVELS * float(space_to_pixel(key, check_value_space(space)))))


def frame_key(key: float, space: ValueSpace) -> float:
    """The key as an 8-bit image actually holds it, in ``space`` (within 1/510 of ``key`` in pixel space).

    Scores compare predictions with this value, the one the model was trained on.
    """
    return float(pixel_to_space(frame_level(key, space) / LEVELS, space))


def check_pattern(pattern: str) -> Pattern:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {', '.join(PATTERNS)}, got {pattern!r}")
    return pattern  # type: ignore[return-value]


def keyed_size(width: int, height: int, frame_width: int, pattern: Pattern) -> tuple[int, int]:
    """Size ``(width, height)`` of the keyed image made from a ``width x height`` one."""
    if check_pattern(pattern) == "border":
        return width + 2 * frame_width, height + 2 * frame_width
    return width, height


def key_mask(height: int, width: int, frame_width: int, pattern: Pattern) -> torch.Tensor:
    """Mask of the key region of a keyed ``height x width`` image (True = key pixels, the region to generate)."""

    if check_pattern(pattern) == "border":
        return frame_mask(height, width, frame_width)
    return center_mask(height, width, frame_width)


def add_key(image: np.ndarray, level: int, frame_width: int, pattern: Pattern) -> np.ndarray:
    """Draw the key (8-bit grey ``level``) on an ``H x W x 3`` uint8 image: a padded frame or a centre square."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} of shape {image.shape}")
    if not 0 <= level <= LEVELS:
        raise ValueError(f"grey level {level} outside [0, {LEVELS}]")
    h, w = image.shape[:2]
    if frame_width < 1:
        raise ValueError(f"frame width must be at least 1 pixel, got {frame_width}")
    if min(h, w) < 2 * frame_width:
        raise ValueError(
            f"a {w}x{h} px image is smaller than twice the frame width ({2 * frame_width} px): "
            "the key would cover more of the image than its content (use a smaller frame or resize)"
        )
    if check_pattern(pattern) == "border":
        out = np.full((h + 2 * frame_width, w + 2 * frame_width, image.shape[2]), level, dtype=np.uint8)
        out[frame_width : frame_width + h, frame_width : frame_width + w] = image
        return out
    out = image.copy()
    out[center_mask(h, w, frame_width).numpy()] = level
    return out
