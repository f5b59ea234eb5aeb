"""The first steps of a sampling loop as detectors read them: the latents after each step and the
conditional noise prediction of each step, from one call of the pipeline itself (no extra UNet call).

The loop is the pipeline's own (any scheduler, guidance on or off, a guarded pipeline's mitigation
included); a ``callback_on_step_end`` keeps the latents and interrupts the loop after ``end`` steps, and
:func:`diffmem.hooks.noise.recorded_unet_calls` reads the UNet's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.conditioning import to_epsilon
from diffmem.detectors.wen import is_guarded
from diffmem.hooks.noise import recorded_unet_calls

__all__ = ["Trajectory", "first_steps"]


@dataclass
class Trajectory:
    """``latents[k]``: the sampler's latent before step ``k`` (``latents[0]`` is the scaled starting noise,
    ``latents[end]`` the latent after the last step run), float32 ``[batch, ...]``; ``cond_eps[k]``: the
    conditional noise prediction at step ``k`` (``k < end``)."""

    latents: list[torch.Tensor]
    cond_eps: list[torch.Tensor]


def first_steps(pipe, prompts: list[str], latents: torch.Tensor, settings: dict, end: int) -> Trajectory:
    """Run ``pipe`` on ``prompts`` from ``latents`` (before ``init_noise_sigma``) for its first ``end`` steps."""
    if end > settings["num_inference_steps"]:
        raise ValueError(
            f"the detector needs {end} sampling steps; num_inference_steps={settings['num_inference_steps']}"
        )
    kept: list[torch.Tensor] = [(latents * pipe.scheduler.init_noise_sigma).detach().float()]

    def keep(p, i, t, callback_kwargs):
        kept.append(callback_kwargs["latents"].detach().float())
        if i + 1 >= end:
            p._interrupt = True
        return {}

    call = dict(
        prompt=list(prompts),
        num_images_per_prompt=settings["num_gens"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        latents=latents,
        height=settings.get("height"),
        width=settings.get("width"),
        output_type="latent",
        callback_on_step_end=keep,
        callback_on_step_end_tensor_inputs=["latents"],
        **settings.get("pipeline_kwargs", {}),
    )
    if is_guarded(pipe) and "mitigation" not in call and "memorization_threshold" not in call:
        call["memorization_threshold"] = 0.0  # no flag is used: keep the model's calibration out of the call
    with torch.no_grad(), recorded_unet_calls(pipe.unet) as calls:
        pipe(**call)
    batch = latents.shape[0]
    if len(calls) != end or len(kept) != end + 1:
        raise RuntimeError(
            f"expected one UNet call per sampling step ({end} steps), saw {len(calls)} calls and "
            f"{len(kept) - 1} steps (a multi-evaluation scheduler is not supported)"
        )
    cond = []
    for c in calls:
        out = c.output[-batch:] if c.output.shape[0] == 2 * batch else c.output
        sample = c.sample[-batch:]
        cond.append(to_epsilon(pipe.scheduler, out, sample, c.timestep))
    return Trajectory(latents=kept, cond_eps=cond)
