"""Replication on the model organism: one definition, used by every measurement on it.

**Definition.** A generated image *replicates* a training image when their SSIM (Wang et al.,
2004; ``diffmem.scores.similarity.ssim``), computed at the generated size (64 x 64 RGB, [0, 1]),
is at least ``REPLICATION_THRESHOLD``. The *nearest training image* of a generation is the one
with the highest SSIM among the ``shortlist`` training images closest to it in pixel L2 (plus, when
given, the training images of its own caption); the shortlist keeps the search fast and in
practice always contains the SSIM-nearest image, which is also close in pixels.

The threshold comes from the two populations measured on ``diffmem-organism-v1``
(``benchmarks/organism_eval.py``, histogram in the model card): generations of verbatim-memorized
captions against their photograph, and generations of held-out captions against their nearest
training image. See ``weights/diffmem-organism-v1/README.md``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.scores.similarity import pairwise_ssim, ssim

#: SSIM at or above which a generation counts as a copy of a training image (see module doc).
REPLICATION_THRESHOLD: float = 0.5


def to_unit_images(images) -> torch.Tensor:
    """PIL images, an N x H x W x 3 uint8 array or an N x 3 x H x W float tensor in [0, 1] -> N x 3 x H x W."""
    if isinstance(images, torch.Tensor):
        x = images.float()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images: expected N x 3 x H x W, got shape {tuple(images.shape)}")
        return x.clamp(0, 1)
    if isinstance(images, np.ndarray):
        arr = images
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover
            Image = None
        if Image is not None and isinstance(images, Image.Image):
            images = [images]
        arr = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected N x H x W x 3, got shape {arr.shape}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float()
    return x / 255.0 if arr.dtype == np.uint8 else x.clamp(0, 1)


@dataclass(frozen=True)
class NearestMatch:
    """The nearest training image of one generation."""

    index: int
    id: str
    caption: str
    role: str
    ssim: float

    @property
    def replicated(self) -> bool:
        return self.ssim >= REPLICATION_THRESHOLD


class TrainingImages:
    """The distinct training images of the organism (or any set), searchable by SSIM."""

    def __init__(
        self, pixels: torch.Tensor, ids: Sequence[str], captions: Sequence[str], roles: Sequence[str]
    ):
        if not (len(pixels) == len(ids) == len(captions) == len(roles)):
            raise ValueError("TrainingImages: pixels, ids, captions and roles must have one entry per image")
        self.pixels = to_unit_images(pixels)
        self.ids, self.captions, self.roles = list(ids), list(captions), list(roles)
        self._flat = self.pixels.flatten(1)
        self._sq = self._flat.pow(2).sum(1)

    @classmethod
    def from_data(cls, data) -> TrainingImages:
        """From a ``diffmem.organism.data.OrganismData``."""
        return cls(
            data.image_array(),
            [im.id for im in data.images],
            [im.caption for im in data.images],
            [im.role for im in data.images],
        )

    def indices_of_caption(self, caption: str) -> list[int]:
        return [i for i, c in enumerate(self.captions) if c == caption]

    def nearest(
        self, generated, shortlist: int = 32, captions: Sequence[str | None] | None = None
    ) -> list[NearestMatch]:
        """Nearest training image (highest SSIM) of each generated image; see the module doc."""
        x = to_unit_images(generated)
        if x.shape[1:] != self.pixels.shape[1:]:
            raise ValueError(
                f"generated images are {tuple(x.shape[1:])}, training images {tuple(self.pixels.shape[1:])}: "
                "compare at the same size"
            )
        flat = x.flatten(1)
        d2 = flat.pow(2).sum(1)[:, None] - 2 * flat @ self._flat.T + self._sq[None]
        k = min(shortlist, len(self.ids))
        near = d2.topk(k, largest=False).indices
        out = []
        for q in range(len(x)):
            cand = near[q].tolist()
            if captions is not None and captions[q] is not None:
                cand = list(dict.fromkeys(cand + self.indices_of_caption(captions[q])))
            s = pairwise_ssim(x[q : q + 1], self.pixels[cand])[0]
            j = int(s.argmax())
            i = cand[j]
            out.append(NearestMatch(i, self.ids[i], self.captions[i], self.roles[i], float(s[j])))
        return out


@functools.lru_cache(maxsize=2)
def organism_training_images(seed: int = 0) -> TrainingImages:
    """The distinct training images of ``diffmem-organism-v1`` (regenerated from the recipe, cached)."""
    from diffmem.organism.data import build_organism_data
    from diffmem.organism.recipe import OrganismRecipe

    return TrainingImages.from_data(build_organism_data(OrganismRecipe(seed=seed)))


def nearest_training_image(generated, training: TrainingImages | None = None, **kwargs) -> list[NearestMatch]:
    """Nearest training image of each generated image (default: over the organism's whole training set)."""
    return (training or organism_training_images()).nearest(generated, **kwargs)


def replicates(generated, reference, threshold: float = REPLICATION_THRESHOLD) -> torch.Tensor:
    """Boolean per pair: ``SSIM(generated_i, reference_i) >= threshold`` (reference may be one image)."""
    x, y = to_unit_images(generated), to_unit_images(reference)
    if len(y) == 1 and len(x) > 1:
        y = y.expand_as(x)
    return ssim(x, y) >= threshold
