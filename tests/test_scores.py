"""Pure math of detection: the noise gap, the v-prediction conversion, the step window, ROC metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmem.scores.detection import detection_metrics
from diffmem.scores.noise_gap import noise_gap, v_to_epsilon_gap_scale, window_mean


def test_noise_gap_is_the_per_sample_l2_norm():
    eps_u = torch.zeros(2, 4, 3, 3)
    eps_c = torch.zeros(2, 4, 3, 3)
    eps_c[0, 0, 0, 0] = 3.0
    eps_c[0, 1, 2, 2] = 4.0  # sample 0: ||(3, 4)|| = 5
    eps_c[1] = 1.0  # sample 1: sqrt(36) = 6
    torch.testing.assert_close(noise_gap(eps_c, eps_u), torch.tensor([5.0, 6.0]))
    assert noise_gap(eps_c.half(), eps_u.half()).dtype == torch.float32


def test_noise_gap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="eps_text has shape"):
        noise_gap(torch.zeros(2, 4), torch.zeros(3, 4))


def test_v_prediction_gap_converts_to_the_noise_gap():
    """For a fixed x_t, v_c - v_u = (eps_c - eps_u) / sqrt(alpha_bar): the scale recovers the eps gap."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor(0.3)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    eps_u = torch.randn(2, 4, 8, 8, generator=g)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps_u
    eps_c = eps_u + 0.5 * torch.randn(2, 4, 8, 8, generator=g)

    def v_from(eps):
        x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0_hat

    v_gap = noise_gap(v_from(eps_c), v_from(eps_u))
    torch.testing.assert_close(
        v_gap * v_to_epsilon_gap_scale(a), noise_gap(eps_c, eps_u), rtol=1e-4, atol=1e-5
    )


def test_window_mean():
    steps = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 6.0, 6.0]])
    torch.testing.assert_close(window_mean(steps), torch.tensor([2.5, 3.0]))
    torch.testing.assert_close(window_mean(steps, 0, 1), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(window_mean(steps, 1, 3), torch.tensor([2.5, 3.0]))
    torch.testing.assert_close(
        window_mean(steps, 2, 10), torch.tensor([3.5, 6.0])
    )  # steps never run are left out
    assert torch.isnan(window_mean(steps, 5, 6)).all()
    with pytest.raises(ValueError, match="start < end"):
        window_mean(steps, 2, 2)


def test_detection_metrics_perfect_separation():
    m = detection_metrics([0.1, 0.2, 0.3, 0.9, 1.0], [0, 0, 0, 1, 1])
    assert m.auc == 1.0 and m.accuracy == 1.0 and m.tpr_at_1pct_fpr == 1.0
    assert 0.3 < m.threshold <= 0.9
    assert (m.n_positive, m.n_negative) == (2, 2 + 1)


def test_detection_metrics_known_values():
    # negatives 1..4, positives 3.5 and 5: one negative (4) outranks one positive (3.5)
    scores = [1.0, 2.0, 3.0, 4.0, 3.5, 5.0]
    labels = [0, 0, 0, 0, 1, 1]
    m = detection_metrics(scores, labels)
    assert m.auc == pytest.approx(7 / 8)  # 7 of the 8 (positive, negative) pairs are ordered right
    assert m.tpr_at_1pct_fpr == pytest.approx(0.5)  # at FPR 0 only the 5.0 positive is found
    # best balanced accuracy: threshold 3.5 gives TPR 1, FPR 1/4 -> 1 - (1/4 + 0)/2 = 0.875
    assert m.accuracy == pytest.approx(0.875)
    assert m.threshold == pytest.approx(3.5)
    flagged = np.asarray(scores) >= m.threshold
    tpr = flagged[np.asarray(labels) == 1].mean()
    fpr = flagged[np.asarray(labels) == 0].mean()
    assert 1 - (fpr + (1 - tpr)) / 2 == pytest.approx(m.accuracy)


def test_detection_metrics_inverted_scores_give_low_auc():
    m = detection_metrics([3.0, 2.0, 1.0, 0.0], [0, 0, 1, 1])
    assert m.auc == 0.0 and m.tpr_at_1pct_fpr == 0.0
    assert math.isfinite(m.threshold)


def test_detection_metrics_agrees_with_torchmetrics_auroc():
    from torchmetrics.functional.classification import binary_auroc

    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(200, generator=g) < 0.3).long()
    scores = torch.randn(200, generator=g) + 1.5 * labels
    m = detection_metrics(scores, labels)
    assert m.auc == pytest.approx(float(binary_auroc(scores, labels)), abs=1e-6)


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        ([0.1, 0.2], [0, 0], "need both classes"),
        ([0.1, float("nan")], [0, 1], "NaN"),
        ([0.1, 0.2, 0.3], [0, 1], "3 scores but 2 labels"),
        ([0.1, 0.2], [0, 2], "labels must be 0"),
    ],
)
def test_detection_metrics_bad_input(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        detection_metrics(scores, labels)
