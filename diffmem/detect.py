"""Early memorization scoring of many prompts, and calibration of the flag threshold.

Wen et al. (ICLR 2024) show that the noise gap of the first denoising step(s) already separates
memorized prompts from ordinary ones, so a scan need not generate images: ``score_prompts`` runs
only the first ``window[1]`` steps of the sampling loop (the pipeline is stopped through
``callback_on_step_end`` and nothing is decoded) and returns the same value the full pipeline's
score over that window would give for the same starting noise. It is the ``wen`` detector of the
registry (:class:`~diffmem.detectors.wen.WenDetector`) over a window, with the prompts checked and an
attention processor chosen. ``calibrate`` picks the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffmem.attention import attention_processors
from diffmem.detectors.wen import WenDetector, noise_gap_scores
from diffmem.scores.detection import DetectionMetrics, detection_metrics

__all__ = ["calibrate", "noise_gap_scores", "score_prompts"]


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
    detector = WenDetector(steps=end, start=start)
    with attention_processors(pipe.unet, attention):
        return detector.score(
            pipe, list(prompts), num_gens=num_gens, seed=seed, item_ids=item_ids,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, batch_size=batch_size,
            progress=progress, height=height, width=width, **pipeline_kwargs,
        )  # fmt: skip


def calibrate(scores, labels) -> DetectionMetrics:
    """AUC, TPR@1%FPR, accuracy and the chosen threshold (Wen et al.'s definitions) from labelled prompts.

    ``scores`` is ``[n]`` or ``[n, num_gens]`` (then averaged over generations, as Wen et al. do);
    ``labels`` are 1 for memorized prompts, 0 otherwise.
    """
    s = torch.as_tensor(scores, dtype=torch.float32)
    if s.ndim == 2:
        s = s.mean(dim=1)
    return detection_metrics(s, labels)
