"""The search stage of a scan: each generation's nearest training image by descriptor, and optionally
the best SSIM over its ``K`` nearest (pixels of the training images, where they are reachable)."""

from __future__ import annotations

import numpy as np

from diffmem.data import load_rgb
from diffmem.records import BadImageError
from diffmem.scan.training import TrainingSet
from diffmem.scores.similarity import ssim


def nearest_training(
    train: TrainingSet | None, emb: np.ndarray, imgs: np.ndarray, ssim_k: int, cache: dict
) -> tuple[np.ndarray, np.ndarray, list]:
    """``(similarity, position, ssim_best)`` of each generation: top-1 inner product and position in
    the training set (``nan`` / ``-1`` without one), and ``(best SSIM, position)`` over the ``ssim_k``
    nearest (``(None, None)`` when off or no training image loads)."""
    n = len(emb)
    if train is None or train.index is None:
        return np.full(n, np.nan, np.float32), np.full(n, -1, np.int64), [(None, None)] * n
    sims, pos = train.search(emb, k=max(1, ssim_k))
    best = ssim_rerank(imgs, pos, train, cache) if ssim_k else [(None, None)] * n
    return sims[:, 0], pos[:, 0], best


def ssim_rerank(imgs: np.ndarray, pos: np.ndarray, train: TrainingSet, cache: dict) -> list:
    """For each generation: ``(best SSIM, its training position)`` over its ``pos.shape[1]`` nearest
    training images by descriptor, each resized to the generation's size (Wang et al. 2004 via torchmetrics)."""
    import torch
    from PIL import Image

    h, w = imgs.shape[1:3]
    out = []
    for n in range(len(imgs)):
        cands = []
        for p in (int(p) for p in pos[n] if p >= 0):
            if p not in cache:
                path = train.image(p)
                try:
                    if path is None:
                        raise BadImageError("missing_image_path", "no image path")
                    im = load_rgb(path, convert_modes=True).resize((w, h), Image.BICUBIC)
                    cache[p] = np.asarray(im, dtype=np.float32) / 255.0
                except BadImageError:
                    cache[p] = None
            if cache[p] is not None:
                cands.append((p, cache[p]))
        if not cands:
            out.append((None, None))
            continue
        ref = torch.from_numpy(np.stack([c for _, c in cands])).permute(0, 3, 1, 2)
        gen = torch.from_numpy(np.ascontiguousarray(imgs[n])).permute(2, 0, 1)[None].expand_as(ref)
        values = ssim(gen, ref)
        best = int(values.argmax())
        out.append((float(values[best]), cands[best][0]))
    return out
