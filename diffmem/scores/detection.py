"""Detection metrics as Wen et al. (ICLR 2024) report them: AUC, TPR at 1% FPR, and accuracy.

From the ROC curve of scores against labels (1 = memorized; a higher score = more memorized):

    AUC        area under the ROC curve
    TPR@1%FPR  TPR at the last ROC point whose FPR is below 0.01
    accuracy   max over thresholds of 1 - (FPR + (1 - TPR)) / 2   (balanced accuracy)

and the threshold that reaches that accuracy (flag a prompt when ``score >= threshold``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["DetectionMetrics", "detection_metrics"]


@dataclass(frozen=True)
class DetectionMetrics:
    """ROC summary of a detector; ``threshold`` is the balanced-accuracy optimum (``score >= threshold``)."""

    auc: float
    tpr_at_1pct_fpr: float
    accuracy: float
    threshold: float
    n_positive: int
    n_negative: int

    def to_dict(self) -> dict:
        return asdict(self)


def _as_1d(values, name: str) -> np.ndarray:
    try:
        arr = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"detection_metrics: {name} must be numbers ({err})") from err
    return arr.reshape(-1) if arr.ndim != 1 else arr


def detection_metrics(scores, labels) -> DetectionMetrics:
    """AUC, TPR@1%FPR, balanced accuracy and its threshold for ``scores`` (higher = memorized) vs 0/1 ``labels``.

    Uses ``sklearn.metrics.roc_curve`` / ``roc_auc_score``. Needs at least one positive and one
    negative label and finite scores.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    s = _as_1d(scores, "scores")
    y = _as_1d(labels, "labels")
    if s.shape != y.shape:
        raise ValueError(
            f"detection_metrics: {s.size} scores but {y.size} labels (expected one label per score)"
        )
    if not np.isfinite(s).all():
        raise ValueError("detection_metrics: scores contain NaN or infinite values")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("detection_metrics: labels must be 0 (not memorized) or 1 (memorized)")
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"detection_metrics: need both classes, got {n_pos} memorized and {n_neg} non-memorized labels"
        )
    fpr, tpr, thresholds = roc_curve(y, s)
    auc = float(roc_auc_score(y, s))
    below = np.where(fpr < 0.01)[0]
    tpr_low = float(tpr[below[-1]]) if below.size else 0.0
    acc = 1.0 - (fpr + (1.0 - tpr)) / 2.0
    best = int(np.argmax(acc))
    threshold = float(thresholds[best])
    if not math.isfinite(threshold):  # sklearn's first point is +inf: flag nothing
        threshold = float(np.max(s)) + 1.0
    return DetectionMetrics(
        auc=auc,
        tpr_at_1pct_fpr=tpr_low,
        accuracy=float(acc[best]),
        threshold=threshold,
        n_positive=n_pos,
        n_negative=n_neg,
    )
