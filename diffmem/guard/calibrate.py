"""Calibrations from scored prompts (``diffmem detect``'s results): the threshold chosen on labelled
prompts, or the one that flags at most a given rate of ordinary prompts' images; each with the conditions
the scores were made under (detector, window, schedule, size, guidance, model, generations, seed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffmem.detect import calibrate
from diffmem.guard.calibration import GuardCalibration, fpr_summary, threshold_at_fpr
from diffmem.scores.detection import DetectionMetrics


def _with_conditions(results: Sequence[dict], scheduler: str, **fields) -> GuardCalibration:
    """A calibration with the conditions stored in the result rows (all alike) and ``fields``."""
    first = results[0]
    return GuardCalibration(
        memorization_window=tuple(first["window"]),
        num_inference_steps=first["num_inference_steps"],
        scheduler=scheduler,
        height=first["height"],
        width=first["width"],
        guidance_scale=first["guidance_scale"],
        model_fingerprint=first["model_fingerprint"],
        num_gens=first["num_gens"],
        seed=first["seed"],
        memorization_detector=first.get("detector"),
        **fields,
    )


def labelled_calibration(
    results: Sequence[dict], scheduler: str, data: str
) -> tuple[GuardCalibration, DetectionMetrics, DetectionMetrics]:
    """The calibration of labelled results (``label`` 1 = memorized), with the metrics per prompt and
    per image. The pipeline flags single images, so the threshold is chosen over single generations."""
    per_prompt = calibrate([r["score"] for r in results], [r["label"] for r in results])
    per_image = calibrate(
        [s for r in results for s in r["scores"]], [r["label"] for r in results for _ in r["scores"]]
    )
    calibration = _with_conditions(
        results,
        scheduler,
        memorization_threshold=per_image.threshold,
        auc=per_image.auc,
        tpr_at_1pct_fpr=per_image.tpr_at_1pct_fpr,
        n_positive=per_image.n_positive,
        n_negative=per_image.n_negative,
        data=data,
        extra={
            "unit": "image",
            "per_prompt": per_prompt.to_dict(),
            "dtype": results[0].get("dtype", "float32"),
        },
    )
    return calibration, per_prompt, per_image


def fpr_calibration(
    results: Sequence[dict], scheduler: str, fpr: float, data: str
) -> tuple[GuardCalibration, dict[str, Any]]:
    """The threshold at ``fpr`` on the per-image scores of ordinary prompts, and the rate it has there
    (images and prompts, Wilson intervals: ``fpr_summary``, with ``threshold``)."""
    scores = [s for r in results for s in r["scores"]]
    prompt_of = [r["id"] for r in results for _ in r["scores"]]
    threshold = threshold_at_fpr(scores, fpr)
    achieved = fpr_summary(scores, prompt_of, threshold)
    calibration = _with_conditions(
        results,
        scheduler,
        memorization_threshold=threshold,
        n_positive=0,
        n_negative=len(scores),
        data=data,
        extra={
            "unit": "image",
            "method": "fpr",
            "target_fpr": fpr,
            **achieved,
            "dtype": results[0].get("dtype", "float32"),
        },
    )
    return calibration, {**achieved, "threshold": threshold}
