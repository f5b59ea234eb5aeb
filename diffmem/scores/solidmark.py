"""SolidMark key distance, memorization rates, chance level and binomial intervals (pure math).

SolidMark (Kriplani et al., "SolidMark: Evaluating Image Memorization in Generative Models",
arXiv:2503.00592) frames every training image with a solid key ``k ~ U[0, 1)``; a model that
memorized the image reproduces the frame when asked to outpaint it. The per-image score is

    k_hat = sum(M * x_gen) / sum(M)         (mean over all frame pixels and channels)
    l_SM  = |k_hat - k|                     (in ONE value space, the key manifest's)

and an image counts as memorized at ``delta`` when ``l_SM < delta``. A prediction independent of
the key hits with probability ``2*delta - delta**2`` (both uniform), the chance level every count is
reported against. Imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

#: The paper's thresholds.
DEFAULT_DELTAS: tuple[float, ...] = (0.1, 0.05, 0.005)

#: ``pixel``: images in [0, 1], the frame holds ``k``. ``model``: the model's normalized [-1, 1]
#: space, the frame holds ``k`` there, i.e. pixel value ``(k + 1) / 2`` (the reference SD code).
ValueSpace = Literal["pixel", "model"]
VALUE_SPACES: tuple[str, ...] = ("pixel", "model")


def check_value_space(space: str) -> ValueSpace:
    if space not in VALUE_SPACES:
        raise ValueError(f"value space must be one of {', '.join(VALUE_SPACES)}, got {space!r}")
    return space  # type: ignore[return-value]


def pixel_to_space(x, space: ValueSpace):
    """Map pixel values in [0, 1] to ``space``: identity for ``pixel``, ``2x - 1`` for ``model``."""
    return x if check_value_space(space) == "pixel" else 2 * x - 1


def space_to_pixel(x, space: ValueSpace):
    """Inverse of :func:`pixel_to_space`: a key ``k`` of ``space`` is drawn with pixel value ``space_to_pixel(k)``."""
    return x if check_value_space(space) == "pixel" else (x + 1) / 2


def frame_mask(height: int, width: int, frame_width: int) -> torch.Tensor:
    """Boolean ``(height, width)`` mask, True on the outer frame of ``frame_width`` pixels (the region to generate)."""
    if frame_width < 1:
        raise ValueError(f"frame width must be at least 1 pixel, got {frame_width}")
    if min(height, width) <= 2 * frame_width:
        raise ValueError(
            f"an image of {width}x{height} px has no interior inside a {frame_width}-px frame "
            f"(both sides must exceed twice the frame width, {2 * frame_width} px)"
        )
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[frame_width : height - frame_width, frame_width : width - frame_width] = False
    return mask


def center_mask(height: int, width: int, side: int) -> torch.Tensor:
    """Boolean ``(height, width)`` mask, True on the central ``side x side`` square (the paper's centre variant)."""
    if side < 1 or side >= min(height, width):
        raise ValueError(f"a centre square of {side} px does not fit inside an image of {width}x{height} px")
    mask = torch.zeros(height, width, dtype=torch.bool)
    top, left = (height - side) // 2, (width - side) // 2
    mask[top : top + side, left : left + side] = True
    return mask


def masked_mean(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image mean of ``images`` ``(B, C, H, W)`` over the pixels of ``mask`` ``(H, W)`` and all channels."""
    if images.ndim != 4:
        raise ValueError(f"images must be (batch, channels, height, width), got shape {tuple(images.shape)}")
    if tuple(mask.shape) != tuple(images.shape[-2:]):
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not match images of shape {tuple(images.shape)}"
        )
    m = mask.to(images.device, images.dtype)
    if m.sum() == 0:
        raise ValueError("the mask selects no pixel")
    return (images * m).sum(dim=(1, 2, 3)) / (m.sum() * images.shape[1])


def predicted_keys(images_pixel: torch.Tensor, mask: torch.Tensor, space: ValueSpace) -> torch.Tensor:
    """``k_hat``: the mean frame value of pixel images ``(B, C, H, W)`` in [0, 1], expressed in ``space``."""
    return pixel_to_space(masked_mean(images_pixel.float(), mask), space)


def key_distance(predicted: Sequence[float] | np.ndarray, keys: Sequence[float] | np.ndarray) -> np.ndarray:
    """``l_SM = |k_hat - k|`` element-wise; both arguments must be in the same value space."""
    p, k = np.asarray(predicted, dtype=np.float64), np.asarray(keys, dtype=np.float64)
    if p.shape != k.shape:
        raise ValueError(
            f"{p.shape[0] if p.ndim else 1} predicted keys for {k.shape[0] if k.ndim else 1} keys"
        )
    return np.abs(p - k)


def frame_distance_map(images_pixel: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, space: ValueSpace):
    """Per-pixel ``|x - k|`` in ``space``, averaged over channels, 0 outside the frame: ``(B, H, W)``.

    The pixel-level variant of the score: where in the frame the model reproduced the key.
    """
    x = pixel_to_space(images_pixel.float(), space).mean(dim=1)
    d = (x - keys.to(x).view(-1, 1, 1)).abs()
    return d * mask.to(d)


def chance_rate(delta: float) -> float:
    """P(|k_hat - k| < delta) for ``k, k_hat ~ U[0, 1)`` independent: ``2*delta - delta**2``."""
    if not 0 < delta <= 1:
        raise ValueError(f"delta must be in (0, 1], got {delta}")
    return 2 * delta - delta**2


def binomial_ci(count: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``count / n`` (scipy's ``binomtest``); ``(nan, nan)`` for ``n == 0``."""
    if n == 0:
        return float("nan"), float("nan")
    if not 0 <= count <= n:
        raise ValueError(f"count {count} outside [0, {n}]")
    from scipy.stats import binomtest

    ci = binomtest(int(count), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def difference_ci(
    count_a: int, n_a: int, count_b: int, n_b: int, confidence: float = 0.95
) -> tuple[float, float, float]:
    """``p_a - p_b`` with Newcombe's hybrid score interval (method 10, from the two Wilson intervals).

    Returns ``(difference, low, high)``. Treats the two rates as independent samples, which is
    conservative for two runs on the same images.
    """
    if n_a == 0 or n_b == 0:
        return float("nan"), float("nan"), float("nan")
    pa, pb = count_a / n_a, count_b / n_b
    la, ua = binomial_ci(count_a, n_a, confidence)
    lb, ub = binomial_ci(count_b, n_b, confidence)
    d = pa - pb
    low = d - float(np.sqrt((pa - la) ** 2 + (ub - pb) ** 2))
    high = d + float(np.sqrt((ua - pa) ** 2 + (pb - lb) ** 2))
    return d, low, high


@dataclass(frozen=True)
class RateSummary:
    """Memorizations at one threshold: ``count`` of ``n`` images with ``l_SM < delta``, its rate and interval."""

    delta: float
    n: int
    count: int
    rate: float
    ci_low: float
    ci_high: float
    chance: float

    def as_dict(self) -> dict:
        return asdict(self)


def memorization_rates(
    distances: Sequence[float] | np.ndarray,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    confidence: float = 0.95,
) -> list[RateSummary]:
    """Count and rate of ``distances < delta`` for each delta, with Wilson intervals and the chance rate."""
    d = np.asarray(distances, dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    out = []
    for delta in deltas:
        count, n = int((d < delta).sum()), int(d.size)
        low, high = binomial_ci(count, n, confidence)
        out.append(
            RateSummary(
                float(delta), n, count, count / n if n else float("nan"), low, high, chance_rate(delta)
            )
        )
    return out


def shuffled_keys(
    keys: Sequence[float] | np.ndarray, seed: int, groups: Sequence[object] | None = None
) -> np.ndarray:
    """The keys re-paired at random so that no image gets a key of its own group: SolidMark's empirical null.

    Comparing every prediction with another image's key keeps the predictions' distribution and the
    keys' distribution but breaks their pairing, so the rate it gives is what chance alone produces.
    ``groups`` (default: every image its own group) marks rows that must not lend each other keys:
    copies of one image, or several generations of one image. Rows are laid out group by group in a
    seeded random order and each takes the key of the row ``s`` places further on (cyclically), with
    ``s`` the largest group's size, so the key always comes from another group.
    """
    k = np.asarray(keys, dtype=np.float64)
    n = k.size
    g = np.arange(n) if groups is None else np.asarray([str(x) for x in groups], dtype=object)
    if len(g) != n:
        raise ValueError(f"{len(g)} groups for {n} keys")
    rng = np.random.default_rng(seed)
    labels, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    largest = int(counts.max()) if n else 0
    if n < 2 or n - largest < largest:
        raise ValueError(
            f"a shuffled-key baseline needs the largest group ({largest} rows) to be at most half of the "
            f"{n} rows, so that every row can take a key of another group"
        )
    group_order = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[group_order] = np.arange(len(labels))
    order = np.lexsort((rng.random(n), rank[inverse]))  # rows grouped, groups and rows in random order
    out = np.empty(n, dtype=np.float64)
    out[order] = k[np.roll(order, -largest)]
    return out
