"""The one interface every image embedder has: PIL images in, L2-normalised float32 rows out."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (names an embedder's weights in its description)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by their L2 norm, so inner product = cosine similarity."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


class Embedder(ABC):
    """An image descriptor for copy detection.

    ``embed`` returns an ``(n, dim)`` float32 array of unit rows; inner products are cosine
    similarities in [-1, 1]. ``replication_threshold`` / ``verbatim_threshold`` are the documented
    similarity levels for "replication" and "verbatim copy" with this descriptor; thresholds do not
    transfer between descriptors or preprocessings, so ``describe()`` is stored with every scan.
    """

    name: str = "embedder"
    dim: int = 0
    preprocessing: str = ""
    replication_threshold: float = 0.5
    verbatim_threshold: float = 0.7
    batch_size: int = 32
    #: sha256 of the weights file a loaded embedder came from (``None``: no file, e.g. the pixel descriptor)
    weights: str | None = None

    @abstractmethod
    def _embed_batch(self, images: Sequence[Any]) -> np.ndarray:
        """Raw descriptors of a batch of RGB PIL images."""

    def embed(self, images: Sequence[Any]) -> np.ndarray:
        """Unit-norm descriptors of RGB PIL images (any sizes), in batches of ``batch_size``."""
        if len(images) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                out.append(np.asarray(self._embed_batch(images[i : i + self.batch_size]), dtype=np.float32))
        return l2_normalize(np.concatenate(out))

    def describe(self) -> dict[str, Any]:
        """What produced the scores: stored with every scan's results."""
        return {
            "embedder": self.name,
            "dim": self.dim,
            "preprocessing": self.preprocessing,
            "replication_threshold": self.replication_threshold,
            "verbatim_threshold": self.verbatim_threshold,
            **({"weights_sha256": self.weights} if self.weights else {}),
        }
