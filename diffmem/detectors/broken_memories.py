"""Broken Memories (Huang et al., KDD 2026, arXiv 2605.22050): memorization as instability of the sampler.

The paper reads the norm of each sampling step's latent update, ``||x_{k+1} - x_k||``, and calls a step
unstable when it leaves an empirical stability region; memorized prompts leave it (their guided noise
prediction is far larger than a stable step's). diffmem's score is the largest per-element RMS update
over the first ``steps`` steps (window ``[start, steps)``):

    score = max_{start <= k < steps} ||x_{k+1} - x_k||_2 / sqrt(d)      (d = latent elements per image)

It reads only what the loop computes: cost ``2 * steps`` UNet evaluations (the guided steps themselves), and
the guarded pipeline reads it from its own loop at no extra call (``memorization_detector="broken-memories"``).
No public code was found and only the abstract was readable here, so the step-wise region bounds of the
paper (fitted on non-memorized prompts) are not reproduced: the raw norm ranks the same as its excess over
a per-step bound for one step, and a threshold on the score plays the bound's role (calibrated like Wen's).
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.detectors.base import register_detector, step_window
from diffmem.detectors.trajectory import LoopDetector, Trajectory

__all__ = ["BrokenMemoriesDetector", "update_norms"]


def update_norms(latents: list[torch.Tensor]) -> torch.Tensor:
    """Per-element RMS norm of each step's latent update, ``[batch, len(latents) - 1]``."""
    steps = [(b - a).flatten(1).norm(dim=1) / (a[0].numel() ** 0.5) for a, b in zip(latents, latents[1:])]
    return torch.stack(steps, dim=1)


@register_detector
class BrokenMemoriesDetector(LoopDetector):
    """Largest latent-update norm over the first ``steps`` sampling steps."""

    name = "broken-memories"
    reference = "Huang et al., KDD 2026"

    def __init__(self, steps: int = 3, start: int = 0):
        self.steps, self.start = step_window(steps, start)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "start": self.start}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 2.0 * min(self.steps, num_inference_steps)

    def loop_steps(self) -> int:
        return self.steps

    def score_trajectory(self, path: Trajectory) -> torch.Tensor:
        return update_norms(path.latents[: self.steps + 1])[:, self.start :].amax(dim=1)
