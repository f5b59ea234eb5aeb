"""The detection evaluator: every detector on every split of a suite, one ground truth, resumable.

For each (detector, split) the per-generation scores are computed once and cached as
``scores/<detector>__<split>.json`` (atomically), so an interrupted run resumes and a new detector adds
its rows without rescoring the others. Metrics come per split for two budgets: all ``num_gens``
generations (the prompt's score is the mean, Wen et al.'s protocol) and one generation (the first
column: the same noise for every detector). The cost is reported as UNet evaluations and measured
seconds per prompt.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffmem.detectors.base import Detector, get_detector
from diffmem.evaluate.metrics import DetectionMetric
from diffmem.evaluate.suites import Suite
from diffmem.io import atomic_write_json
from diffmem.modelio import model_settings

__all__ = ["evaluate_detectors", "load_scores"]


def _scores_for(
    detector: Detector, pipe, split: str, prompts, cache_dir: Path, settings: dict, progress: bool
):

    path = cache_dir / f"{detector.key()}__{split}.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("settings") == settings and data.get("ids") == [p.id for p in prompts]:
            return torch.tensor(data["scores"]), data["seconds"]
    start = time.perf_counter()
    scores = detector.score(
        pipe,
        [p.prompt for p in prompts],
        item_ids=[p.id for p in prompts],
        num_gens=settings["num_gens"],
        seed=settings["seed"],
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        batch_size=settings["batch_size"],
        progress=progress,
    )
    seconds = time.perf_counter() - start
    atomic_write_json(
        path,
        {"settings": settings, "ids": [p.id for p in prompts], "scores": scores.tolist(), "seconds": seconds},
    )
    return scores, seconds


def evaluate_detectors(
    pipe,
    suite: Suite,
    detectors: Sequence[str | Detector],
    out_dir: str | Path,
    *,
    num_gens: int = 4,
    seed: int = 0,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    n_boot: int = 1000,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"settings", "suite", "methods": {key: {"config", "cost", "splits": {split: {"gens_N", "gens_1"}}}}}``.

    The per-prompt scores of every method and split are in ``out_dir/scores/`` (the ROC curves are drawn
    from them).
    """
    out_dir = Path(out_dir)
    cache = out_dir / "scores"
    settings = {
        "num_gens": num_gens,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        **model_settings(pipe),
    }
    methods: dict[str, Any] = {}
    for spec in detectors:
        detector = get_detector(spec)
        key = detector.key()
        splits, seconds, n_prompts = {}, 0.0, 0
        for split, prompts in suite.splits.items():
            scores, sec = _scores_for(detector, pipe, split, prompts, cache, settings, progress)
            seconds += sec
            n_prompts += len(prompts)
            labels = [p.label for p in prompts]
            row = {}
            for budget, values in ((f"gens_{num_gens}", scores.mean(dim=1)), ("gens_1", scores[:, 0])):
                metric = DetectionMetric(n_boot=n_boot, seed=seed)
                metric.update(values, labels)
                row[budget] = metric.compute()
            splits[split] = row
        methods[key] = {
            "config": detector.config(),
            "reference": detector.reference,
            "cost": {
                "unet_evals_per_generation": detector.unet_evals(num_inference_steps),
                "unet_evals_per_prompt": detector.unet_evals(num_inference_steps) * num_gens,
                "seconds_per_prompt": seconds / max(1, n_prompts),
            },
            "splits": splits,
        }
    return {
        "settings": settings,
        "suite": {"name": suite.name, "info": suite.info, "sizes": suite.summary()},
        "labels": {split: [p.label for p in prompts] for split, prompts in suite.splits.items()},
        "methods": methods,
    }


def load_scores(out_dir: str | Path, key: str, split: str) -> list[list[float]] | None:
    """Cached per-generation scores of one method and split (``None`` when not computed)."""
    path = Path(out_dir) / "scores" / f"{key}__{split}.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["scores"]
