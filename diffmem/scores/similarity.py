"""Image similarity for replication: SSIM (torchmetrics) and normalized pixel distance, pairwise.

SSIM (Wang et al., 2004) compares local means, contrasts and structure in an 11x11 Gaussian window,
``SSIM(x, y) = mean_w [(2 mu_x mu_y + C1)(2 s_xy + C2)] / [(mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)]``,
1 for identical images, near 0 for unrelated ones. Images are N x C x H x W floats in [0, 1].
"""

from __future__ import annotations

import torch


def ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair SSIM of two equally shaped batches ``N x C x H x W`` in [0, 1] -> ``N``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if preds.shape != target.shape:
        raise ValueError(f"ssim: shapes differ ({tuple(preds.shape)} vs {tuple(target.shape)})")
    if preds.ndim != 4:
        raise ValueError(f"ssim: expected N x C x H x W images, got shape {tuple(preds.shape)}")
    return structural_similarity_index_measure(
        preds.float(), target.float(), data_range=1.0, reduction="none"
    ).reshape(-1)


def pairwise_ssim(queries: torch.Tensor, references: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """SSIM of every query against every reference: ``Q x C x H x W``, ``R x C x H x W`` -> ``Q x R``."""
    if queries.shape[1:] != references.shape[1:]:
        raise ValueError(
            f"pairwise_ssim: image shapes differ ({tuple(queries.shape[1:])} vs {tuple(references.shape[1:])})"
        )
    q, r = len(queries), len(references)
    out = torch.empty(q, r)
    pairs = torch.cartesian_prod(torch.arange(q), torch.arange(r))
    for start in range(0, len(pairs), chunk):
        p = pairs[start : start + chunk]
        out[p[:, 0], p[:, 1]] = ssim(queries[p[:, 0]], references[p[:, 1]])
    return out


def normalized_l2(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Root-mean-square pixel difference per pair, ``sqrt(mean((x - y)^2))`` in [0, 1] -> ``N``."""
    if preds.shape != target.shape:
        raise ValueError(f"normalized_l2: shapes differ ({tuple(preds.shape)} vs {tuple(target.shape)})")
    return (preds.float() - target.float()).pow(2).flatten(1).mean(1).sqrt()
