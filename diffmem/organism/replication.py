"""Replication on the model organism: one definition, used by every measurement on it.

**Definition.** A generated image *replicates* a training image when their SSIM (Wang et al.,
2004; ``diffmem.scores.similarity.ssim``), computed at the generated size (64 x 64 RGB, [0, 1]),
is at least ``REPLICATION_THRESHOLD``. The *nearest training image* of a generation is the one
with the highest SSIM among the ``shortlist`` training images closest to it in pixel L2 (plus, when
given, the training images of its own caption); the shortlist keeps the search fast and in
practice always contains the SSIM-nearest image, which is also close in pixels.

The threshold is set from the training data alone, no generation enters it: it lies
above the SSIM of every pair of *distinct* training images that share a generic caption
(:func:`same_caption_ssim`; on the organism's data, 15,872 pairs, at most 0.66, 99.9 % under 0.58).
A generation at or above it is closer to one training image than any two different scenes of one
caption ("a red circle" on two backgrounds) are to each other: a copy, not a new scene of the same
content. (v1 used 0.5, read off a training snapshot; with v2's sharper autoencoder, two unrelated
renders of one caption already reach 0.66, so 0.5 counted new scenes as copies; this rule was
adopted after the first evaluation of v2 had shown that.) Template images
share one layout by design and are far more alike (0.89-0.95), which is what template memorization
means. ``tests/test_organism.py`` checks that the threshold stays above every same-caption pair.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.organism.data import build_organism_data
from diffmem.organism.recipe import OrganismRecipe

# SSIM at or above which a generation counts as a copy of a training image (see module doc); one source
from diffmem.scores.replication import ORGANISM_SSIM_THRESHOLD as REPLICATION_THRESHOLD
from diffmem.scores.similarity import pairwise_ssim, ssim


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

    def of_roles(self, roles: Sequence[str]) -> TrainingImages:
        """The training images of ``roles`` only (e.g. the memorized ones: verbatim and template)."""
        keep = [i for i, r in enumerate(self.roles) if r in roles]
        return TrainingImages(
            self.pixels[keep],
            [self.ids[i] for i in keep],
            [self.captions[i] for i in keep],
            [self.roles[i] for i in keep],
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
def organism_training_images(seed: int = 0, recipe=None) -> TrainingImages:
    """The distinct training images of an organism (``recipe``, default ``diffmem-organism-v2``'s with
    ``seed``), regenerated from its recipe."""

    return TrainingImages.from_data(build_organism_data(recipe or OrganismRecipe(seed=seed)))


def nearest_training_image(generated, training: TrainingImages | None = None, **kwargs) -> list[NearestMatch]:
    """Nearest training image of each generated image (default: over the organism's whole training set)."""
    return (training or organism_training_images()).nearest(generated, **kwargs)


def same_caption_ssim(training: TrainingImages, role: str = "generic", chunk: int = 1024) -> torch.Tensor:
    """SSIM of every pair of distinct ``role`` training images that share a caption (the null of copying)."""
    by_caption: dict[str, list[int]] = {}
    for i, (c, r) in enumerate(zip(training.captions, training.roles)):
        if r == role:
            by_caption.setdefault(c, []).append(i)
    pairs = [pair for idx in by_caption.values() for pair in itertools.combinations(idx, 2)]
    if not pairs:
        return torch.zeros(0)
    left, right = torch.tensor(pairs).T
    return torch.cat(
        [
            ssim(training.pixels[left[k : k + chunk]], training.pixels[right[k : k + chunk]])
            for k in range(0, len(pairs), chunk)
        ]
    )


def replicates(generated, reference, threshold: float = REPLICATION_THRESHOLD) -> torch.Tensor:
    """Boolean per pair: ``SSIM(generated_i, reference_i) >= threshold`` (reference may be one image)."""
    x, y = to_unit_images(generated), to_unit_images(reference)
    if len(y) == 1 and len(x) > 1:
        y = y.expand_as(x)
    return ssim(x, y) >= threshold
