"""A fine-tuning ground truth in the organism's style: a known subset of the images repeats ``repeats`` times.

The setting of the training-time mitigation papers (Wen et al.: 200 LAION images repeated 200 times among
non-repeated ones; Somepalli et al.; MemControl): a pretrained model is fine-tuned on data whose duplicated
subset repeats ``n`` times, so what can be memorized is known. The images are fresh renderings of the
organism's generic scenes ("a {colour} {shape}" with unnamed details, :func:`render_generic`) over the
organism's training colour/shape pairs, each with its own caption ("a red circle, catalogue plate 7"), like
the unique captions of replicated LAION images. Everything comes from code and ``seed``: the same seed
writes identical files.

The folder is an image folder (``metadata.jsonl``, one PNG per training row, duplicates included) with the
columns ``image_id`` (the distinct image a row copies), ``memorized`` (1 for the duplicated subset) and
``copies``; ``manifest.json`` records the settings and the duplicated ids, ``heldout_captions.txt`` the
captions for fidelity that are in neither this set nor the organism's training (its held-out pairs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffmem.data import ImageFolderWriter
from diffmem.io import atomic_write_json, atomic_write_text
from diffmem.organism.data import caption_of, generic_and_heldout_pairs, render_generic
from diffmem.seeding import derive_seed

__all__ = ["FinetuneSet", "build_duplicated_finetune_set"]

HELDOUT_FILE = "heldout_captions.txt"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class FinetuneSet:
    """What :func:`build_duplicated_finetune_set` wrote."""

    folder: Path
    image_ids: list[str]  # the distinct images, in order
    duplicated_ids: list[str]  # the ones that repeat ``repeats`` times
    captions: dict[str, str]  # image id -> caption
    heldout_captions: list[str]  # for fidelity: in neither this set nor the organism's training
    generic_captions: list[str]  # the organism's generic captions ("a {colour} {shape}")
    rows: int  # training rows (images written)


def build_duplicated_finetune_set(
    out: str | os.PathLike,
    *,
    n_images: int = 200,
    duplicated: int = 20,
    repeats: int = 20,
    seed: int = 0,
    image_size: int = 64,
) -> FinetuneSet:
    """Write ``n_images`` distinct images to the empty (or new) folder ``out``, ``duplicated`` of them
    (chosen from ``seed``) ``repeats`` times each: ``n_images - duplicated + duplicated * repeats`` rows."""

    for key, value, low in (
        ("n_images", n_images, 1),
        ("duplicated", duplicated, 0),
        ("repeats", repeats, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{key}: expected an integer >= {low}, got {value!r}")
    if duplicated > n_images:
        raise ValueError(f"duplicated: {duplicated} is more than n_images={n_images}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {out} is not empty; write the fine-tuning set to a new folder")
    train_pairs, held_pairs = generic_and_heldout_pairs()
    rng = np.random.default_rng(derive_seed(seed, "finetune", "duplicated"))
    chosen = set(rng.choice(n_images, size=duplicated, replace=False).tolist())
    image_ids, duplicated_ids, captions = [], [], {}
    width = len(str(max(repeats - 1, 1)))
    with ImageFolderWriter(out) as writer:
        for i in range(n_images):
            colour, shape = train_pairs[i % len(train_pairs)]
            image_id = f"finetune-{i:04d}"
            caption = f"{caption_of(colour, shape)}, catalogue plate {i}"
            pixels = render_generic(colour, shape, derive_seed(seed, "finetune", "image", i), image_size)
            copies = repeats if i in chosen else 1
            for c in range(copies):
                writer.add(
                    f"{image_id}.{c:0{width}d}",
                    caption,
                    pixels,
                    image_id=image_id,
                    memorized=int(i in chosen),
                    copies=copies,
                )
            image_ids.append(image_id)
            captions[image_id] = caption
            if i in chosen:
                duplicated_ids.append(image_id)
        rows = writer.count
    heldout = [caption_of(c, s) for c, s in held_pairs]
    generic = [caption_of(c, s) for c, s in train_pairs]
    atomic_write_text(out / HELDOUT_FILE, "".join(c + "\n" for c in heldout))
    atomic_write_json(
        out / MANIFEST_FILE,
        {
            "name": "diffmem organism fine-tuning set (duplicated subset)",
            "settings": {
                "n_images": n_images,
                "duplicated": duplicated,
                "repeats": repeats,
                "seed": seed,
                "image_size": image_size,
            },
            "rows": rows,
            "duplicated_ids": duplicated_ids,
            "heldout_captions": heldout,
            "generic_captions": generic,
        },
    )
    return FinetuneSet(out, image_ids, duplicated_ids, captions, heldout, generic, rows)
