"""Wen et al.'s memorization score: the gap between text-conditional and unconditional noise predictions.

Wen, Liu, Chen, Lyu, "Detecting, Explaining, and Mitigating Memorization in Diffusion Models", ICLR 2024:

    d_t = || eps(x_t, t, c) - eps(x_t, t, empty) ||_2          (over all latent values of one image)
    score = mean_{start <= t < end} d_t                            (then the mean over generations)

A memorized prompt pins one image, so its conditional prediction sits far from the unconditional one
from the very first step; an ordinary prompt leaves the output free and the gap small.
"""

from __future__ import annotations

import torch

__all__ = ["noise_gap", "v_to_epsilon_gap_scale", "window_mean"]


def noise_gap(eps_text: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm ``||eps_text - eps_uncond||_2`` over all non-batch dimensions, in float32.

    ``eps_text`` and ``eps_uncond`` have the same shape ``[B, ...]``; the result has shape ``[B]``.
    """
    if eps_text.shape != eps_uncond.shape:
        raise ValueError(
            f"noise_gap: eps_text has shape {tuple(eps_text.shape)} but eps_uncond has "
            f"{tuple(eps_uncond.shape)} (expected equal shapes [batch, ...])"
        )
    if eps_text.ndim < 1:
        raise ValueError("noise_gap: expected tensors with a batch dimension")
    diff = eps_text.float() - eps_uncond.float()
    return torch.linalg.vector_norm(diff.reshape(diff.shape[0], -1), ord=2, dim=1)


def v_to_epsilon_gap_scale(alpha_bar_t: torch.Tensor | float) -> torch.Tensor:
    """Factor that turns a v-prediction gap into the noise-prediction gap at the same step.

    With ``v = sqrt(a) eps - sqrt(1 - a) x0`` and ``x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)`` for a
    fixed ``x_t`` (``a`` = alpha-bar of the step): ``v_c - v_u = (eps_c - eps_u) / sqrt(a)``, so
    ``||eps_c - eps_u|| = sqrt(a) ||v_c - v_u||``.
    """
    return torch.as_tensor(alpha_bar_t, dtype=torch.float32).sqrt()


def window_mean(step_gaps: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Mean of per-step gaps ``step_gaps[..., start:end]`` over the window ``[start, end)``.

    ``step_gaps`` has shape ``[..., n_steps]`` (steps = UNet calls of the sampling loop, in order).
    Steps of the window that were never run (an interrupted loop) are left out; a window with no
    step at all gives NaN.
    """
    if start < 0 or (end is not None and end <= start):
        raise ValueError(f"window_mean: expected 0 <= start < end, got start={start}, end={end}")
    part = step_gaps[..., start:end]
    if part.shape[-1] == 0:
        return torch.full(step_gaps.shape[:-1], float("nan"), dtype=torch.float32)
    return part.float().mean(dim=-1)
