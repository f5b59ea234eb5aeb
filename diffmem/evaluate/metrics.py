"""Metrics of the harness as torchmetrics ``Metric`` classes (``update`` / ``compute``), with confidence intervals.

:class:`DetectionMetric`: AUC and TPR at 1 % FPR (``diffmem.scores.detection.detection_metrics``) with
percentile bootstrap 95 % intervals (prompts resampled with a seed, stratified by label) and the chance
levels (AUC 0.5, TPR@1%FPR 0.01). :class:`ReplicationRate`: a proportion with its Wilson 95 % interval.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import Metric

from diffmem.scores.detection import detection_metrics
from diffmem.scores.solidmark import binomial_ci

__all__ = ["DetectionMetric", "ReplicationRate", "bootstrap_ci"]


def bootstrap_ci(
    scores: np.ndarray, labels: np.ndarray, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95
):
    """Percentile intervals of (AUC, TPR@1%FPR), resampling positives and negatives separately."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    aucs, tprs = [], []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        m = detection_metrics(scores[idx], labels[idx])
        aucs.append(m.auc)
        tprs.append(m.tpr_at_1pct_fpr)
    lo, hi = (1 - confidence) / 2 * 100, (1 + confidence) / 2 * 100
    return tuple(np.percentile(aucs, [lo, hi])), tuple(np.percentile(tprs, [lo, hi]))


class DetectionMetric(Metric):
    """ROC summary of scores (higher = memorized) against 0/1 labels, with bootstrap intervals."""

    full_state_update = False

    def __init__(self, n_boot: int = 1000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.n_boot, self.seed = n_boot, seed
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores, labels) -> None:
        self.scores.append(torch.as_tensor(scores, dtype=torch.float64).flatten())
        self.labels.append(torch.as_tensor(labels, dtype=torch.float64).flatten())

    def compute(self) -> dict:
        s = torch.cat(self.scores).numpy() if self.scores else np.zeros(0)
        y = torch.cat(self.labels).numpy() if self.labels else np.zeros(0)
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        if n_pos == 0 or n_neg == 0:
            return {"n_positive": n_pos, "n_negative": n_neg, "auc": None, "note": "needs both classes"}
        m = detection_metrics(s, y)
        auc_ci, tpr_ci = bootstrap_ci(s, y, self.n_boot, self.seed)
        return {
            "auc": m.auc,
            "auc_ci": list(auc_ci),
            "tpr_at_1pct_fpr": m.tpr_at_1pct_fpr,
            "tpr_ci": list(tpr_ci),
            "threshold": m.threshold,
            "n_positive": n_pos,
            "n_negative": n_neg,
            "chance_auc": 0.5,
            "chance_tpr_at_1pct_fpr": 0.01,
        }


class ReplicationRate(Metric):
    """The share of replicating items, with its Wilson 95 % interval."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, replicated) -> None:
        r = torch.as_tensor(replicated, dtype=torch.bool).flatten()
        self.hits += int(r.sum())
        self.total += r.numel()

    def compute(self) -> dict:

        hits, total = int(self.hits), int(self.total)
        low, high = binomial_ci(hits, total)
        return {"rate": hits / total if total else float("nan"), "ci": [low, high], "count": hits, "n": total}
