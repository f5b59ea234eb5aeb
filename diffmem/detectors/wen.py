"""Wen et al.'s noise-gap detector (ICLR 2024): ``mean_{k < steps} ||eps(x_k, c) - eps(x_k, empty)||_2``.

The first step (``steps=1``) is the paper's recommended early detector: one classifier-free-guidance
batch, 2 UNet evaluations per generation, no image. More steps follow the guided trajectory
(``guidance_scale``). The scores are exactly the guarded pipeline's (:func:`diffmem.detect.noise_gap_scores`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.detectors.base import Detector, register_detector

__all__ = ["WenDetector"]


@register_detector
class WenDetector(Detector):
    """Noise gap averaged over the first ``steps`` UNet calls of the sampling loop."""

    name = "wen"
    reference = "Wen et al., ICLR 2024"

    def __init__(self, steps: int = 1):
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        self.steps = steps

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 2.0 * min(self.steps, num_inference_steps)

    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:
        from diffmem.detect import noise_gap_scores

        if self.steps > settings["num_inference_steps"]:
            raise ValueError(
                f"wen: steps={self.steps} exceeds num_inference_steps={settings['num_inference_steps']}"
            )
        return noise_gap_scores(
            pipe,
            prompts,
            latents,
            num_gens=settings["num_gens"],
            window=(0, self.steps),
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
        )
