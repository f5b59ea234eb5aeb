"""DSM, the early-detection paper's score change (ICML 2026, code ``randomnameforicml/icml-2026``).

The change of the conditional score between consecutive sampling steps ``k`` and ``k + 1``:

    DSM_k = || eps(x_{k+1}, c) - eps(x_k, c) ||_2^2

The paper writes it with the score ``s_c``; the authors' code takes it in noise-prediction space (no
``1/sigma_t``), as diffmem does. ``step=1`` (steps 1 -> 2) has the best TPR@1%FPR of the authors' summary
(SD-1.5, 500 + 500: AUC 0.9745, TPR@1%FPR 85.8 %); ``step=0`` is 0 -> 1. The latents ``x_k`` are the pipeline's own guided loop,
so the score needs nothing beyond sampling: cost ``2 * (step + 2)`` UNet evaluations (the authors' code
skips the last unconditional half: ``2 * step + 3``); the guarded pipeline reads it from its own loop at no
extra call (``memorization_detector="dsm"``).
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.detectors.base import register_detector
from diffmem.detectors.trajectory import LoopDetector, Trajectory

__all__ = ["DSMDetector"]


@register_detector
class DSMDetector(LoopDetector):
    """``||eps_c(x_{step+1}) - eps_c(x_step)||^2`` along the guided sampling loop."""

    name = "dsm"
    reference = "Early detection, ICML 2026"

    def __init__(self, step: int = 1):
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step: expected an integer >= 0, got {step!r}")
        self.step = step

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 2.0 * (self.step + 2)

    def loop_steps(self) -> int:
        return self.step + 2

    def score_trajectory(self, path: Trajectory) -> torch.Tensor:
        change = path.cond_eps[self.step + 1] - path.cond_eps[self.step]
        return change.flatten(1).pow(2).sum(dim=1)
