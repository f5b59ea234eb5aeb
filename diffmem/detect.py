"""Early memorization scoring of many prompts, and calibration of the flag threshold.

Wen et al. (ICLR 2024) show that the noise gap of the first denoising step(s) already separates
memorized prompts from ordinary ones, so a scan need not generate images: ``score_prompts`` runs
only the first ``window[1]`` steps of the sampling loop (the pipeline is stopped through
``callback_on_step_end`` and nothing is decoded) and returns the same value the full pipeline's
score over that window would give for the same starting noise. ``calibrate`` picks the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffmem.attention import attention_processors
from diffmem.hooks.noise import capture_noise_gap
from diffmem.scores.detection import DetectionMetrics, detection_metrics
from diffmem.scores.noise_gap import window_mean
from diffmem.seeding import item_generator

__all__ = ["calibrate", "initial_latents", "noise_gap_scores", "score_prompts"]


def _is_guarded(pipe) -> bool:
    """True for diffmem's guarded pipelines (they score the loop themselves, mitigation included; each
    names the stock class it wraps)."""
    return getattr(type(pipe), "stock_pipeline_class", None) is not None


def initial_latents(
    pipe, item_ids: Sequence, num_gens: int, seed: int, height: int | None = None, width: int | None = None
) -> torch.Tensor:
    """Starting noise ``[len(item_ids) * num_gens, C, h, w]`` (item-major), generation j of item i from
    ``diffmem.seeding.item_generator(seed, item_id, j)``: independent of batch size and order."""
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    shape = (1, pipe.unet.config.in_channels, height // scale, width // scale)
    draws = [
        torch.randn(shape, generator=item_generator(seed, i, j)) for i in item_ids for j in range(num_gens)
    ]
    return torch.cat(draws)


def _stop_after(end: int):
    """A ``callback_on_step_end`` that interrupts the loop once the first ``end`` UNet calls are done."""

    def callback(pipe, i, t, callback_kwargs):
        if i + 1 >= end:
            pipe._interrupt = True
        return {}

    return callback


def _check_args(prompts, num_gens, window, num_inference_steps, batch_size, item_ids):
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
    for k, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts[{k}]: expected a non-empty string, got {p!r}")
    if not isinstance(num_gens, int) or num_gens < 1:
        raise ValueError(f"num_gens: expected an integer >= 1, got {num_gens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an integer >= 1, got {batch_size!r}")
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(f"window: expected (start, end), got {window!r}") from None
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= num_inference_steps):
        raise ValueError(
            f"window: expected integers 0 <= start < end <= num_inference_steps={num_inference_steps}, got {window!r}"
        )
    if item_ids is not None:
        if len(item_ids) != len(prompts):
            raise ValueError(
                f"item_ids: {len(item_ids)} ids for {len(prompts)} prompts (expected one per prompt)"
            )
        if len(set(map(str, item_ids))) != len(item_ids):
            raise ValueError("item_ids: ids must be unique (each seeds its prompt's noise)")
    return start, end


def score_prompts(
    pipe,
    prompts: Sequence[str],
    *,
    num_gens: int = 4,
    window: tuple[int, int] = (0, 1),
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seed: int = 0,
    item_ids: Sequence | None = None,
    batch_size: int = 8,
    progress: bool = True,
    attention: str | None = "auto",
    height: int | None = None,
    width: int | None = None,
    **pipeline_kwargs,
) -> torch.Tensor:
    """Wen et al.'s score of each prompt and generation from the first ``window[1]`` steps only.

    Returns a float32 tensor ``[len(prompts), num_gens]``: entry ``[i, j]`` is the mean over steps
    ``window[0] <= k < window[1]`` of ``||eps(x_k, c_i) - eps(x_k, empty)||_2`` for generation ``j``,
    whose starting noise comes from ``item_generator(seed, item_ids[i], j)`` (``item_ids`` default to
    the prompt indices), so results do not depend on ``batch_size`` (prompts per batch). The prompt's
    score is the row mean. ``pipe`` is any Stable Diffusion pipeline; with diffmem's guarded pipeline
    its own scoring (and mitigation, via ``pipeline_kwargs``) is used. ``attention="auto"`` uses
    xformers on CUDA when installed, else PyTorch SDPA; the model's processors are restored after.
    """
    start, end = _check_args(prompts, num_gens, window, num_inference_steps, batch_size, item_ids)
    ids = list(range(len(prompts))) if item_ids is None else list(item_ids)
    device = pipe._execution_device
    dtype = pipe.unet.dtype

    from tqdm.auto import tqdm

    old_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    results = torch.empty(len(prompts), num_gens)
    try:
        with (
            attention_processors(pipe.unet, attention),
            tqdm(total=len(prompts), desc="scoring prompts", unit="prompt", disable=not progress) as bar,
        ):
            for b in range(0, len(prompts), batch_size):
                batch_prompts = list(prompts[b : b + batch_size])
                latents = initial_latents(pipe, ids[b : b + batch_size], num_gens, seed, height, width)
                scores = noise_gap_scores(
                    pipe,
                    batch_prompts,
                    latents.to(device=device, dtype=dtype),
                    num_gens=num_gens,
                    window=(start, end),
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=height,
                    width=width,
                    **pipeline_kwargs,
                )
                results[b : b + len(batch_prompts)] = scores.reshape(len(batch_prompts), num_gens)
                bar.update(len(batch_prompts))
    finally:
        pipe._progress_bar_config = old_bar
    return results


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
    guided = _is_guarded(pipe)
    call = dict(
        prompt=list(prompts),
        num_images_per_prompt=num_gens,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        latents=latents,
        height=height,
        width=width,
        output_type="latent",
        callback_on_step_end=_stop_after(end),
        **pipeline_kwargs,
    )
    if guided:
        # scores only: an explicit threshold keeps the model's calibration out of the call (no flag is used)
        if "mitigation" not in call and "memorization_threshold" not in call:
            call["memorization_threshold"] = 0.0
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


def calibrate(scores, labels) -> DetectionMetrics:
    """AUC, TPR@1%FPR, accuracy and the chosen threshold (Wen et al.'s definitions) from labelled prompts.

    ``scores`` is ``[n]`` or ``[n, num_gens]`` (then averaged over generations, as Wen et al. do);
    ``labels`` are 1 for memorized prompts, 0 otherwise.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    if s.ndim == 2:
        s = s.mean(dim=1)
    return detection_metrics(s, labels)
