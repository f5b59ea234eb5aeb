"""Wen et al.'s noise-gap detector (ICLR 2024): ``mean_{start <= k < steps} ||eps(x_k, c) - eps(x_k, empty)||_2``.

The first step (``steps=1``) is the paper's recommended early detector: one classifier-free-guidance
batch, 2 UNet evaluations per generation, no image. More steps follow the guided trajectory
(``guidance_scale``). The scores are exactly the guarded pipeline's (:func:`noise_gap_scores`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.detectors.base import Detector, register_detector, step_window
from diffmem.hooks.noise import capture_noise_gap
from diffmem.scores.noise_gap import window_mean

__all__ = ["WenDetector", "is_guarded", "noise_gap_scores", "stop_after"]


def is_guarded(pipe) -> bool:
    """True for diffmem's guarded pipelines (they score the loop themselves, mitigation included), marked
    by ``MemGuardMixin.scores_memorization``."""
    return bool(getattr(type(pipe), "scores_memorization", False))


def stop_after(end: int):
    """A ``callback_on_step_end`` that interrupts the loop once the first ``end`` UNet calls are done."""

    def callback(pipe, i, t, callback_kwargs):
        if i + 1 >= end:
            pipe._interrupt = True
        return {}

    return callback


def noise_gap_scores(
    pipe,
    prompts: list[str],
    latents: torch.Tensor,
    *,
    num_gens: int,
    window: tuple[int, int],
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None = None,
    width: int | None = None,
    **pipeline_kwargs,
) -> torch.Tensor:
    """Wen et al.'s windowed score ``[len(prompts) * num_gens]`` from the given starting noise (one batch).

    Runs ``pipe`` for the first ``window[1]`` steps only; the guarded pipeline scores itself, any other
    SD pipeline gets the capture hook.
    """
    start, end = window
    guided = is_guarded(pipe)
    call = dict(
        prompt=list(prompts),
        num_images_per_prompt=num_gens,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=latents,
        height=height,
        width=width,
        output_type="latent",
        callback_on_step_end=stop_after(end),
        **pipeline_kwargs,
    )
    if guided:
        # scores only: an explicit threshold keeps the model's calibration out of the call (no flag is used)
        if "mitigation" not in call and "memorization_threshold" not in call:
            call["memorization_threshold"] = 0.0
        call.setdefault(
            "memorization_detector", "wen"
        )  # the noise gap, whatever the folder's default detector
        out = pipe(**call, memorization_window=(start, end))
        return torch.tensor(out.memorization_scores, dtype=torch.float32)
    guidance = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    uncond = None
    if not guidance:
        with torch.no_grad():
            uncond, _ = pipe.encode_prompt([""], pipe._execution_device, 1, False)
    with capture_noise_gap(
        pipe.unet,
        guidance=guidance,
        uncond_embeds=uncond,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        alphas_cumprod=getattr(pipe.scheduler, "alphas_cumprod", None),
    ) as record:
        pipe(**call)
    return window_mean(record.as_tensor(), start, end)


@register_detector
class WenDetector(Detector):
    """Noise gap averaged over the first ``steps`` UNet calls of the sampling loop."""

    name = "wen"
    reference = "Wen et al., ICLR 2024"

    def __init__(self, steps: int = 1, start: int = 0):
        self.steps, self.start = step_window(steps, start)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "start": self.start}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 2.0 * min(self.steps, num_inference_steps)

    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:
        if self.steps > settings["num_inference_steps"]:
            raise ValueError(
                f"wen: steps={self.steps} exceeds num_inference_steps={settings['num_inference_steps']}"
            )
        return noise_gap_scores(
            pipe,
            prompts,
            latents,
            num_gens=settings["num_gens"],
            window=(self.start, self.steps),
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=settings["guidance_scale"],
            height=settings.get("height"),
            width=settings.get("width"),
            **settings.get("pipeline_kwargs", {}),
        )
