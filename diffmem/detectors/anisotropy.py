"""Asthana & Belagiannis's anisotropy detector (ICLR 2026, arXiv:2601.20642): two passes on pure noise.

On the same starting noise ``x_T``, one conditional and one unconditional UNet evaluation at a
high-noise and at a low-noise timestep of the schedule (``timesteps[0]`` and ``timesteps[-3]``: 981 and
41 for 50 DDIM steps, as the authors' code), with ``u``/``c`` the unconditional/conditional outputs and
``D = c - u``:

    N = || D(x_T, t_hi) ||_2                                  (the isotropic norm term; noise-prediction space)
    A = mean_{pixels} cos( u[:, p], D[:, p] ) at t_lo         (cosine over the latent channels at each pixel)
    S = gamma_norm * N + gamma_angle * A                       (higher = memorized)

Defaults ``gamma = (1, 2)`` are the code's for SD-1.4 (SD-2: (1, 0.1)); they are model-specific, as
the paper says, so a harness run on another model should be read with that in mind. The cosine is
taken on the raw UNet outputs (v for v-prediction models, as the code does), the norm on the
noise-prediction gap. Cost: 2 classifier-free-guidance batches, 4 UNet evaluations per generation (the
code runs 8). The paper's TPR@1%FPR is read at the nearest ROC point; diffmem's at FPR < 1 %.
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.conditioning import guidance_batch, to_epsilon
from diffmem.detectors.base import Detector, register_detector, timestep_schedule

__all__ = ["AnisotropyDetector"]


@register_detector
class AnisotropyDetector(Detector):
    """``gamma_norm * ||D(t_hi)|| + gamma_angle * mean_p cos(u, D)(t_lo)`` on pure noise."""

    name = "anisotropy"
    reference = "Asthana & Belagiannis, ICLR 2026"

    def __init__(self, gamma_norm: float = 1.0, gamma_angle: float = 2.0, low_index: int = -3):
        self.gamma_norm, self.gamma_angle, self.low_index = (
            float(gamma_norm),
            float(gamma_angle),
            int(low_index),
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "gamma_norm": self.gamma_norm,
            "gamma_angle": self.gamma_angle,
            "low_index": self.low_index,
        }

    def unet_evals(self, num_inference_steps: int) -> float:
        return 4.0

    @torch.no_grad()
    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:

        embeds, extra = guidance_batch(pipe, prompts, settings["num_gens"])
        embeds = embeds.to(latents.dtype)
        timesteps = timestep_schedule(pipe, settings["num_inference_steps"])
        if not -len(timesteps) <= self.low_index < len(timesteps):
            raise ValueError(
                f"anisotropy: low_index={self.low_index} needs a schedule of at least {abs(self.low_index)} "
                f"steps, got num_inference_steps={settings['num_inference_steps']}"
            )
        x_t = latents * pipe.scheduler.init_noise_sigma

        def branches(t):
            x = pipe.scheduler.scale_model_input(x_t, t)
            out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=embeds, **extra).sample.float()
            return x.float(), *out.chunk(2)

        x, u, c = branches(timesteps[0])
        gap = to_epsilon(pipe.scheduler, c, x, timesteps[0]) - to_epsilon(pipe.scheduler, u, x, timesteps[0])
        norm = gap.flatten(1).norm(dim=1)
        _, u, c = branches(timesteps[self.low_index])
        angle = torch.nn.functional.cosine_similarity(u, c - u, dim=1, eps=1e-8).flatten(1).mean(dim=1)
        return self.gamma_norm * norm + self.gamma_angle * angle
