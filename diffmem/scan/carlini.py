"""Carlini et al.'s generate-and-filter check (USENIX Security'23, "Extracting Training Data from
Diffusion Models"): generations of one prompt that are near-copies of *each other* betray memorization.

Distance: the image is cut into a ``grid`` x ``grid`` array of non-overlapping tiles (4 x 4 = 16 tiles
of 128 px for 512 px images, as in the paper) and the distance is the largest tile distance, each
``sqrt(mean((a - b)^2))`` over the tile's values in [0, 1] (dimension-normalised L2); the maximum keeps
a global colour match from hiding a differing region. Two generations are linked when the distance is
below ``delta`` (0.15, the value re-implementations use); a prompt is flagged when the largest clique
of linked generations has at least ``min_clique`` members (10 of 500 in the paper).
"""

from __future__ import annotations

import numpy as np


def tiled_l2(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    """Max over ``grid``² tiles of the dimension-normalised L2 distance of HxWxC images in [0, 1]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"tiled_l2: images of different shapes {a.shape} and {b.shape}")
    h, w = a.shape[:2]
    ys = np.linspace(0, h, grid + 1).astype(int)
    xs = np.linspace(0, w, grid + 1).astype(int)
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            d = a[ys[i] : ys[i + 1], xs[j] : xs[j + 1]] - b[ys[i] : ys[i + 1], xs[j] : xs[j + 1]]
            if d.size:
                worst = max(worst, float(np.sqrt(np.mean(d * d))))
    return worst


def pairwise_tiled_l2(images: list[np.ndarray], grid: int = 4) -> np.ndarray:
    """Symmetric ``(n, n)`` matrix of ``tiled_l2`` (zero diagonal)."""
    n = len(images)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            out[i, j] = out[j, i] = tiled_l2(images[i], images[j], grid)
    return out


def max_clique_size(adjacency: np.ndarray) -> int:
    """Size of the largest clique of an undirected graph (Bron-Kerbosch with pivoting; fine for the
    tens of generations per prompt a scan makes)."""
    adj = np.asarray(adjacency, dtype=bool)
    n = len(adj)
    neighbours = [set(np.flatnonzero(adj[i])) - {i} for i in range(n)]
    best = 0

    def expand(r: int, p: set, x: set) -> None:
        nonlocal best
        if not p and not x:
            best = max(best, r)
            return
        if r + len(p) <= best:
            return
        pivot = max(p | x, key=lambda u: len(neighbours[u] & p))
        for v in list(p - neighbours[pivot]):
            expand(r + 1, p & neighbours[v], x & neighbours[v])
            p = p - {v}
            x = x | {v}

    expand(0, set(range(n)), set())
    return best


def carlini_clique(images: list[np.ndarray], delta: float = 0.15, grid: int = 4) -> tuple[int, float]:
    """``(largest clique size, smallest off-diagonal tiled-L2 distance)`` among one prompt's generations."""
    if len(images) < 2:
        return len(images), float("nan")
    d = pairwise_tiled_l2(images, grid)
    off = d[~np.eye(len(d), dtype=bool)]
    return max_clique_size(d < delta), float(off.min())
