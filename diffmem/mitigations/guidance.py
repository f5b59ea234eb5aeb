"""Jain et al.'s delayed guidance (CVPR 2025, "Classifier-Free Guidance inside the Attraction Basin May Cause
Memorization", arXiv:2411.16738) as an inference-time mitigation.

Guidance applied while the trajectory is still inside a memorized image's attraction basin pulls it
to the copy; held back until a transition point, the same prompt gives a new image. For each flagged
image the guidance weight becomes ``w(t)``: ``early_scale`` before the transition, the call's scale
``s`` after. It is applied per image, without touching the stock loop, by a UNet forward hook that
rewrites the conditional half of the guidance batch,

    c' = u + (w(t) / s) (c - u)    so that the loop's  u + s (c' - u) = u + w(t) (c - u)

(exact for ``guidance_rescale=0``). The transition is **static** (``t > transition``: the authors'
defaults are ``early_scale=0`` until ``t=500``, or opposite guidance ``early_scale=-2`` until ``t=650``)
or **dynamic** (``transition="dynamic"``): the code's rule, conditional only (``w=1``) until the step
just after the first strict local minimum of ``||u - c||``, then ``s`` (``w=1`` throughout if none).
The score the guard reports is read before the rewrite (the UNet's own gap). Costs nothing.
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.hooks.guidance import guidance_schedule_hook
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation

__all__ = ["GuidanceDelayMitigation", "dynamic_weight", "static_weight"]


def static_weight(transition: float, early_scale: float):
    """``w(t) = early_scale`` while ``t > transition``, then the call's scale."""

    def weight(t, u, c, state, scale):
        return torch.full((u.shape[0],), early_scale if t > transition else scale)

    return weight


def dynamic_weight(t, u, c, state, scale):
    """Conditional only (``w = 1``) until the step after the first strict local minimum of ``||u - c||``."""
    gap = (u - c).flatten(1).norm(dim=1).float().cpu()
    history = state.setdefault("gaps", [])
    fired = state.setdefault("fired", torch.zeros(u.shape[0], dtype=torch.bool))
    if len(history) >= 2:
        fired |= (gap > history[-1]) & (history[-2] > history[-1])
    history.append(gap)
    return torch.where(fired, torch.tensor(scale), torch.tensor(1.0))


@register_mitigation
class GuidanceDelayMitigation(Mitigation):
    """Guidance ``early_scale`` for flagged images until ``transition`` (a timestep, or ``"dynamic"``)."""

    name = "guidance-delay"
    kind = "guidance"

    def __init__(self, transition: float | str = 500, early_scale: float = 0.0):
        if transition != "dynamic" and (
            isinstance(transition, bool) or not isinstance(transition, (int, float))
        ):
            raise ValueError(f"transition: expected a timestep or 'dynamic', got {transition!r}")
        self.transition, self.early_scale = transition, float(early_scale)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "transition": self.transition, "early_scale": self.early_scale}

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        if not any(batch.flagged):
            return MitigationPlan()
        if not batch.guidance:
            raise ValueError(
                "mitigation 'guidance-delay' needs classifier-free guidance (guidance_scale > 1)"
            )
        if self.transition == "dynamic":
            weight = dynamic_weight
        else:
            weight = static_weight(float(self.transition), self.early_scale)
        report = {k: {"action": self.name} for k, f in enumerate(batch.flagged) if f}
        return MitigationPlan(
            context=guidance_schedule_hook(
                batch.pipe.unet, torch.tensor(batch.flagged), weight, batch.current_guidance_scale
            ),
            report=report,
        )
