"""Dataset-level statistics of a scan (pure functions on arrays).

Somepalli et al. (CVPR'23, "Diffusion Art or Digital Forgery?") summarise a scan by the top-1
similarity ``x0`` of every generation to the training set: its mean, std, 75th/90th/95th percentiles
(``sim_95pc`` is their headline "95th-percentile similarity") and the fraction above 0.5
(``sim_gt_05pc``); the same statistics of ``x1``, each training image's similarity to its nearest
*other* training image, give the background (``bg_*``) that a scan must be read against. The names
below follow their code; ``frac_gt_verbatim`` adds the 0.7 verbatim level of Wen et al. / NeMo.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def similarity_stats(
    values: Sequence[float], prefix: str, thresholds: dict[str, float] | None = None
) -> dict:
    """``{prefix}_mean, _std, _75pc, _90pc, _95pc, _max, _n`` and ``{prefix}_gt_{name}`` fractions
    (strictly greater than the threshold, as in Somepalli et al.'s ``sim_gt_05pc``)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    out: dict[str, float | int | None] = {f"{prefix}_n": int(x.size)}
    if x.size == 0:
        for key in ("mean", "std", "75pc", "90pc", "95pc", "max"):
            out[f"{prefix}_{key}"] = None
    else:
        out[f"{prefix}_mean"] = float(x.mean())
        out[f"{prefix}_std"] = float(x.std())
        for q in (75, 90, 95):
            out[f"{prefix}_{q}pc"] = float(np.percentile(x, q))
        out[f"{prefix}_max"] = float(x.max())
    for name, t in (thresholds or {}).items():
        out[f"{prefix}_gt_{name}"] = float((x > t).mean()) if x.size else None
    return out


def flag_metrics(flagged: Sequence[bool], labels: Sequence[int]) -> dict:
    """Precision, recall and counts of per-caption flags against 0/1 labels (1 = memorized)."""
    f = np.asarray(flagged, dtype=bool)
    y = np.asarray(labels, dtype=int) == 1
    tp = int((f & y).sum())
    fp = int((f & ~y).sum())
    fn = int((~f & y).sum())
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": int((~f & ~y).sum()),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
    }


def top_fraction(scores: Sequence[float], ids: Sequence[str], fraction: float) -> set[str]:
    """Ids of the ``ceil(fraction * n)`` highest scores (ties broken by id), Webster-style pre-filter."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--top-fraction: expected 0 < fraction <= 1, got {fraction}")
    n = len(ids)
    k = int(np.ceil(fraction * n))
    order = sorted(range(n), key=lambda i: (-float(scores[i]), str(ids[i])))
    return {str(ids[i]) for i in order[:k]}
