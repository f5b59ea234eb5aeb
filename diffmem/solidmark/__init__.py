"""SolidMark (Kriplani et al., arXiv:2503.00592): keyed training data and per-image memorization scores.

``keys``: seeded keys and keyed images; ``manifest``: the key manifest and its checks against a
dataset; ``keying``: key a whole dataset; ``scoring``: outpaint and score, resumable;
``summary``: rates, chance, shuffled-key null, comparisons, reports. The math lives in
:mod:`diffmem.scores.solidmark`, the outpainting pipeline in
:mod:`diffmem.pipelines.pipeline_solidmark_outpaint`.
"""

from diffmem.solidmark.keying import MANIFEST_NAME, key_dataset
from diffmem.solidmark.keys import DEFAULT_FRAME_WIDTH, DEFAULT_SEED, add_key, draw_key, frame_key, key_mask
from diffmem.solidmark.manifest import (
    KeyEntry,
    KeyManifest,
    check_ids,
    check_keyed_dataset,
    check_keyed_image,
)

__all__ = [
    "DEFAULT_FRAME_WIDTH",
    "DEFAULT_SEED",
    "MANIFEST_NAME",
    "KeyEntry",
    "KeyManifest",
    "add_key",
    "check_ids",
    "check_keyed_dataset",
    "check_keyed_image",
    "draw_key",
    "frame_key",
    "key_dataset",
    "key_mask",
]
