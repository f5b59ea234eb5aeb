"""Han et al.'s initial-noise adjustment (NeurIPS 2025, arXiv:2510.08625), batch-wise variant.

A memorized prompt's starting noise lies in a sharp region where the guidance direction
``e(x) = eps(x, y) - eps(x, empty)`` is large; moving ``x_T`` out of it lets guidance start early.
Gradient-free, ``iterations`` times on every flagged image:

    d = rho ||x_T|| e(x_T) / ||e(x_T)||          x_T <- x_T - gamma ( e(x_T + d) - e(x_T) )

(a finite-difference Hessian-vector step: gradient descent on ``||e||``), then guidance off (``w=0``)
for ``t > transition`` and the call's scale after (:mod:`diffmem.mitigations.guidance`). The paper's
defaults for SD-1.4: ``gamma = 0.7``, radius 50 at ``||x_T|| ~ 128`` (``rho = 0.39``, given here relative
to ``||x_T||`` so it carries to other latent sizes), 2 iterations, ``transition = 900``. Cost: 2 guidance
batches per iteration (4 UNet evaluations), about 8 % of a 50-step generation at SD's defaults.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from diffmem.conditioning import to_epsilon
from diffmem.hooks.guidance import guidance_schedule_hook
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation
from diffmem.mitigations.guidance import static_weight

__all__ = ["InitialNoiseMitigation", "adjust_initial_noise"]


def adjust_initial_noise(
    direction, x: torch.Tensor, rho: float, gamma: float, iterations: int
) -> torch.Tensor:
    """Han et al.'s batch-wise update, ``iterations`` times: ``x <- x - gamma (e(x + d) - e(x))``,
    ``d = rho ||x|| e(x) / ||e(x)||`` per sample (``direction`` is ``e``)."""
    for _ in range(iterations):
        e = direction(x)
        step = rho * x.flatten(1).norm(dim=1) / e.flatten(1).norm(dim=1).clamp_min(1e-12)
        d = step.view(-1, *([1] * (x.dim() - 1))) * e
        x = x - gamma * (direction(x + d) - e)
    return x


@register_mitigation
class InitialNoiseMitigation(Mitigation):
    """Move flagged images' ``x_T`` out of the sharp region, then delay their guidance (Han et al.)."""

    name = "initial-noise"
    kind = "noise"

    def __init__(self, rho: float = 0.39, gamma: float = 0.7, iterations: int = 2, transition: float = 900):
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations: expected an integer >= 1, got {iterations!r}")
        self.rho, self.gamma, self.iterations, self.transition = (
            float(rho),
            float(gamma),
            iterations,
            float(transition),
        )

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rho": self.rho,
            "gamma": self.gamma,
            "iterations": self.iterations,
            "transition": self.transition,
        }

    @torch.no_grad()
    def plan(self, batch: GuardedBatch) -> MitigationPlan:

        if not any(batch.flagged):
            return MitigationPlan()
        if not batch.guidance:
            raise ValueError("mitigation 'initial-noise' needs classifier-free guidance (guidance_scale > 1)")
        pipe = batch.pipe
        start = time.perf_counter()
        rows = [k for k, f in enumerate(batch.flagged) if f]
        t0 = batch.timesteps[0]
        sigma = pipe.scheduler.init_noise_sigma
        cond, neg = batch.prompt_embeds[rows], batch.negative_prompt_embeds[rows]
        extra = batch.cfg_unet_kwargs(rows)

        def direction(x):  # e(x) = eps(x, y) - eps(x, empty) for the flagged rows
            inp = pipe.scheduler.scale_model_input(x, t0)
            out = pipe.unet(
                torch.cat([inp, inp]), t0, encoder_hidden_states=torch.cat([neg, cond]), **extra
            ).sample
            u, c = out.chunk(2)
            return to_epsilon(pipe.scheduler, c, x, t0) - to_epsilon(pipe.scheduler, u, x, t0)

        x = batch.latents[rows] * sigma
        before = direction(x).flatten(1).norm(dim=1)
        x = adjust_initial_noise(direction, x, self.rho, self.gamma, self.iterations)
        after = direction(x).flatten(1).norm(dim=1)
        latents = batch.latents.clone()
        latents[rows] = (x / sigma).to(latents.dtype)
        batch.latents = latents
        elapsed = time.perf_counter() - start
        report = {
            k: {
                "action": self.name,
                "gap_before": float(b),
                "gap_after": float(a),
                "seconds": elapsed / len(rows),
            }
            for k, b, a in zip(rows, before, after)
        }
        context = guidance_schedule_hook(
            pipe.unet,
            torch.tensor(batch.flagged),
            static_weight(self.transition, 0.0),
            batch.current_guidance_scale,
        )
        return MitigationPlan(context=context, report=report)
