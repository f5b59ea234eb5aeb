"""Attack targets: (id, caption, training image) records of a dataset, and their images as tensors."""

from __future__ import annotations

import numpy as np
import torch

from diffmem.data import load_rgb, open_dataset, split_rows
from diffmem.records import BadImageError, Record


def load_targets(path: str, argument: str = "--targets", limit: int | None = None) -> list[Record]:
    """(id, caption, image path) records of a targets dataset; the first bad row is an error naming it."""
    records, bad = split_rows(open_dataset(path, argument=argument))
    if bad:
        b = bad[0]
        raise ValueError(f"{argument}: {b.source or path} row {b.row} (id {b.id}): {b.reason}: {b.detail}")
    if not records:
        raise ValueError(f"{argument}: {path} holds no targets")
    return records[:limit] if limit else records


def load_image_tensor(path, argument: str = "--targets") -> torch.Tensor:
    """An image file as a float ``[3, H, W]`` tensor in [0, 1]."""
    try:
        im = load_rgb(path)
    except BadImageError as err:
        raise ValueError(f"{argument}: {path}: {err}") from err
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
