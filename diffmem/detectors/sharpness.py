"""Jeon et al.'s sharpness detector (ICML 2025): the Hessian-score product of the noise gap at the first step.

With the score ``s(x, y) = -eps(x, t, y) / sigma_t`` and its Jacobian ``H = ds/dx``, memorized prompts sit
in sharp regions of the log-density, where the gap between conditional and unconditional curvature is
large along the guidance direction. At the first timestep ``t_0`` on ``x_T``:

    M = || H_D s_D ||,   s_D = s(x, y) - s(x, empty),  H_D = H(x, y) - H(x, empty)
      = || J(eps_D) eps_D || / sigma_t^2                  (eps_D = eps(x, y) - eps(x, empty), J = d/dx)

one forward-mode Jacobian-vector product (``torch.func.jvp``) of the batched guidance call along its own
output. The paper writes the squared norm; the authors' code averages the unsquared norm over
generations, which diffmem does (the ranking is the same for one generation). ``x`` is the sampler's
latent (for DDIM the paper's ``x_t``). Cost: one guidance batch (2 UNet evaluations) and its JVP (about 2
more), 4 per generation. ``method="finite-difference"`` uses a central difference instead (2 more
guidance batches), for models whose operations lack forward-mode derivatives.
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.attention import attention_processors
from diffmem.conditioning import guidance_batch, to_epsilon
from diffmem.detectors.base import Detector, register_detector, timestep_schedule

__all__ = ["SharpnessDetector"]


@register_detector
class SharpnessDetector(Detector):
    """``|| J(eps_D) eps_D || / sigma_t^2`` at the first timestep (Jeon et al.)."""

    name = "sharpness"
    reference = "Jeon et al., ICML 2025"

    def __init__(self, method: str = "jvp", step: float = 1e-3):
        if method not in ("jvp", "finite-difference"):
            raise ValueError(f"method: expected 'jvp' or 'finite-difference', got {method!r}")
        self.method, self.step = method, float(step)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 4.0 if self.method == "jvp" else 6.0

    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:

        embeds, extra = guidance_batch(pipe, prompts, settings["num_gens"])
        embeds = embeds.to(latents.dtype)
        t = timestep_schedule(pipe, settings["num_inference_steps"])[0]
        x_t = (latents * pipe.scheduler.init_noise_sigma).float()
        unet_dtype = pipe.unet.dtype

        def eps_gap(x: torch.Tensor) -> torch.Tensor:
            inp = pipe.scheduler.scale_model_input(x, t).to(unet_dtype)
            out = pipe.unet(torch.cat([inp, inp]), t, encoder_hidden_states=embeds, **extra).sample.float()
            u, c = out.chunk(2)
            return to_epsilon(pipe.scheduler, c, x, t) - to_epsilon(pipe.scheduler, u, x, t)

        # forward-mode derivatives need the plain attention processor (SDPA/xformers kernels have none)
        with torch.no_grad(), attention_processors(pipe.unet, "naive"):
            gap = eps_gap(x_t)
            if self.method == "jvp":
                _, jd = torch.func.jvp(eps_gap, (x_t,), (gap,))
            else:
                h = self.step * x_t.flatten(1).norm(dim=1) / gap.flatten(1).norm(dim=1).clamp_min(1e-12)
                h = h.view(-1, *([1] * (x_t.dim() - 1)))
                jd = (eps_gap(x_t + h * gap) - eps_gap(x_t - h * gap)) / (2 * h)
        alpha_bar = pipe.scheduler.alphas_cumprod.to(jd.device)[int(t)].float()
        return jd.flatten(1).norm(dim=1) / (1 - alpha_bar)
