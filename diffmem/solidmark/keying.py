"""Key a dataset: draw a SolidMark key per image, draw it on the image, write the keyed image folder + manifest.

Every image of an image folder or table (read with :mod:`diffmem.data`) gets a key
``k = draw_key(seed, image id)`` (``duplicate_keys="fresh"``, the paper's choice: every copy of a
duplicated image has its own key) or ``draw_key(seed, content hash)`` (``"shared"``: all copies of
one image carry one key). The keyed folder keeps every column of the source (id, caption, role, ...)
and adds ``solidmark_key``; ``solidmark_manifest.json`` is written beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from diffmem.data import ImageFolderWriter, check_record, open_dataset
from diffmem.io import atomic_write_text
from diffmem.records import BadRow
from diffmem.scores.solidmark import check_value_space
from diffmem.solidmark.keys import (
    DEFAULT_FRAME_WIDTH,
    DEFAULT_SEED,
    add_key,
    check_pattern,
    draw_key,
    frame_key,
    frame_level,
)
from diffmem.solidmark.manifest import DUPLICATE_POLICIES, KeyEntry, KeyManifest

MANIFEST_NAME = KeyManifest.config_name


@dataclass
class KeyingResult:
    """What :func:`key_dataset` wrote: the keyed folder, its manifest and the rows it set aside."""

    folder: Path
    manifest_path: Path
    manifest: KeyManifest
    bad_rows: list[dict] = field(default_factory=list)


def content_hash(image: np.ndarray) -> str:
    """SHA-256 (first 16 hex digits) of an ``H x W x 3`` uint8 image's size and pixels: equal for verbatim copies."""
    h = hashlib.sha256(f"{image.shape}".encode())
    h.update(np.ascontiguousarray(image).tobytes())
    return h.hexdigest()[:16]


def fit_content(image, side: int):
    """Centre-crop a PIL image to a square and resize it to ``side x side`` (bicubic)."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC)


def key_dataset(
    data: str | os.PathLike,
    out: str | os.PathLike,
    *,
    frame_width: int = DEFAULT_FRAME_WIDTH,
    value_space: str = "pixel",
    seed: int = DEFAULT_SEED,
    pattern: str = "border",
    duplicate_keys: str = "fresh",
    size: int | None = None,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    progress: bool = True,
) -> KeyingResult:
    """Write a keyed copy of ``data`` to ``out`` (PNG image folder + ``metadata.jsonl`` + key manifest).

    ``size``: if given, every keyed image is ``size x size``: the content is centre-cropped and resized
    to ``size - 2 * frame_width`` (border) or ``size`` (centre) first; otherwise images keep their size
    and the border pattern pads them outward (the paper). Rows that cannot be read are set aside and
    listed in ``bad_rows.jsonl``; they get no key.
    """

    check_pattern(pattern)
    check_value_space(value_space)
    if duplicate_keys not in DUPLICATE_POLICIES:
        raise ValueError(f"--duplicate-keys must be 'fresh' or 'shared', got {duplicate_keys!r}")
    if frame_width < 1:
        raise ValueError(f"--frame-width must be at least 1 pixel, got {frame_width}")
    content_side = None
    if size is not None:
        content_side = size - 2 * frame_width if pattern == "border" else size
        if content_side < 2 * frame_width:
            raise ValueError(
                f"--size {size} leaves {content_side} px of content inside a {frame_width}-px frame; "
                f"it must leave at least twice the frame width ({2 * frame_width} px)"
            )
    out = Path(out)
    if (out / MANIFEST_NAME).exists():
        raise ValueError(
            f"--out: {out} already holds a keyed dataset ({MANIFEST_NAME}); choose an empty folder"
        )
    rows = open_dataset(data, id_column=id_column, caption_column=caption_column, image_column=image_column)
    entries: list[KeyEntry] = []
    bad: list[dict] = []
    with ImageFolderWriter(out) as writer:
        for item in tqdm(rows, desc="keying", unit="img", disable=not progress):
            if isinstance(item, BadRow):
                bad.append(item.as_dict())
                continue
            image, bad_row = check_record(item)
            if bad_row is not None:
                bad.append(bad_row.as_dict())
                continue
            if content_side is not None:
                image = fit_content(image, content_side)
            pixels = np.asarray(image, dtype=np.uint8)
            group = content_hash(pixels)
            key = draw_key(seed, item.id if duplicate_keys == "fresh" else f"content:{group}")
            try:
                keyed = add_key(pixels, frame_level(key, value_space), frame_width, pattern)  # type: ignore[arg-type]
            except ValueError as err:
                raise ValueError(f"--data: image {item.id!r} ({item.image}): {err}") from err
            extra = {k: v for k, v in item.extra.items() if k not in ("file_name", "id", "text")}
            writer.add(item.id, item.caption, keyed, **extra, solidmark_key=key)
            entries.append(
                KeyEntry(
                    id=item.id,
                    key=key,
                    frame_key=frame_key(key, value_space),  # type: ignore[arg-type]
                    width=keyed.shape[1],
                    height=keyed.shape[0],
                    group=group,
                )
            )
    if not entries:
        raise ValueError(f"--data: {data} has no readable image ({len(bad)} row(s) set aside)")
    manifest = KeyManifest(
        pattern=pattern,
        frame_width=frame_width,
        value_space=value_space,
        seed=seed,
        entries=entries,
        duplicate_keys=duplicate_keys,
        info={"source": str(data), "size": size},
    )
    if bad:
        atomic_write_text(out / "bad_rows.jsonl", "".join(json.dumps(b) + "\n" for b in bad))
    path = manifest.save(out / MANIFEST_NAME)
    return KeyingResult(out, path, manifest, bad)
