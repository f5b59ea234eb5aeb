"""Pixel descriptor for small models: images resized to ``size`` x ``size``, centred and L2-normalised.

The inner product of two descriptors is the Pearson correlation of their pixels (normalised
cross-correlation), so exact copies score 1, colour-shifted or brightness-scaled copies also score 1,
and unrelated images score near 0. Documented thresholds (diffmem's own choice for small models, not a
published one): 0.8 = replication, 0.9 = verbatim; benchmarks/RESULTS.md ("Dataset-wide scans") shows
how they separate copies on the model organism. They do not transfer to other descriptors. For natural
photographs at scale use SSCD.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffmem.embed.base import Embedder


class PixelEmbedder(Embedder):
    """``size``² x 3 pixel values (bilinear resize, [0, 1]), minus their mean, L2-normalised."""

    replication_threshold = 0.8
    verbatim_threshold = 0.9

    def __init__(self, size: int = 32, batch_size: int = 256):
        if size < 2:
            raise ValueError(f"--pixel-size: {size} is too small (expected at least 2)")
        self.size = size
        self.dim = size * size * 3
        self.name = f"pixel{size}"
        self.preprocessing = (
            f"Resize([{size}, {size}], bilinear) -> [0, 1] -> subtract the image mean -> L2 normalise"
        )
        self.batch_size = batch_size

    def _embed_batch(self, images: Sequence[Any]) -> np.ndarray:
        from PIL import Image

        rows = []
        for im in images:
            arr = np.asarray(
                im.convert("RGB").resize((self.size, self.size), Image.BILINEAR), dtype=np.float32
            )
            arr = arr.reshape(-1) / 255.0
            rows.append(arr - arr.mean())
        return np.stack(rows)
