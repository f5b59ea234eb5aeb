"""``organism``: the measured ground truth of a model organism, with its dose-response by copy count.

Generates every verbatim, template, held-out, generic (and trigger) caption with ``--seeds`` seeds through
the guarded pipeline (:func:`diffmem.organism.evaluate.run_evaluation`), and measures:

* replication: SSIM (at the recipe's size) of each generation to its nearest training image
  (``diffmem.organism.replication``), per caption role, with the histogram of the populations;
* detection: Wen et al.'s score over the first step, the first 10 steps and all steps, AUC and TPR
  at 1 % FPR of verbatim (and, separately, template and generic) captions against held-out ones;
* on a graded recipe (v3, v4), replication and detection per duplication count.

Writes ``results.json``, ``generations.jsonl``, ``images.npz``, ``ssim_histogram.png`` and the Markdown
for ``benchmarks/RESULTS.md``. ``--write-calibration`` stores the first-step flag threshold in the model
folder (``diffmem_calibration.json``, which ``diffmem demo`` uses); ``--write-card`` the model card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.fingerprint import model_fingerprint
from diffmem.guard.calibration import GuardCalibration
from diffmem.io import atomic_write_text
from diffmem.modelio import default_model
from diffmem.organism.card import model_card
from diffmem.organism.evaluate import dose_response_markdown, run_evaluation
from diffmem.organism.recipe import OrganismRecipe
from diffmem.report import histogram_figure, save_figure

__all__ = ["OrganismBench", "first_step_calibration", "organism_markdown", "ssim_histogram_png"]


def ssim_histogram_png(generations: list[dict], threshold: float, path: Path) -> Path:
    """The SSIM populations (own image for verbatim/template, nearest for generic/held-out) as a PNG."""
    groups = {
        "verbatim: SSIM to own photo": [g["own_ssim"] for g in generations if g["role"] == "verbatim"],
        "template: SSIM to own template": [g["own_ssim"] for g in generations if g["role"] == "template"],
        "generic: SSIM to nearest": [g["nearest_ssim"] for g in generations if g["role"] == "generic"],
        "held-out: SSIM to nearest": [g["nearest_ssim"] for g in generations if g["role"] == "heldout"],
    }
    return save_figure(histogram_figure(groups, "SSIM at 64 px", threshold=threshold, bins=40), path)


def first_step_calibration(pipe, results: dict) -> GuardCalibration:
    """The guard's calibration from the measured first-step detection of verbatim vs held-out captions."""
    first = results["summary"]["detection"]["first_step"]["verbatim_vs_heldout"]
    height, width = pipe.image_size()
    return GuardCalibration(
        memorization_threshold=first["threshold"],
        memorization_window=(0, 1),
        num_inference_steps=results["num_inference_steps"],
        scheduler=type(pipe.scheduler).__name__,
        height=height,
        width=width,
        guidance_scale=results["guidance_scale"],
        model_fingerprint=model_fingerprint(pipe.unet),
        auc=first["auc"],
        tpr_at_1pct_fpr=first["tpr_at_1pct_fpr"],
        n_positive=first.get("n_positive"),
        n_negative=first.get("n_negative"),
        num_gens=results["seeds"],
        data="verbatim vs held-out captions of the organism (benchmarks/organism_eval.py)",
        extra={"replication_threshold_ssim": results["summary"]["replication_threshold"]},
    )


def organism_markdown(results: dict, seconds: float) -> str:
    """The RESULTS section: replication targets, detection per window, dose-response, SSIM quantiles."""
    s = results["summary"]
    pooled = "; every copy count pooled, per count below" if s.get("dose_response") else ""
    lines = [
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} CPU, "
        f"{datetime.date.today().isoformat()}. Script: `python benchmarks/organism_eval.py` "
        f"({results['seeds']} seeds per caption, {results['num_inference_steps']} DDIM steps, guidance "
        f"{results['guidance_scale']}; {seconds / 60:.1f} min).",
        "",
        f"Replication = SSIM >= {s['replication_threshold']:.2f} between a generation and a training image at 64 px "
        "(nearest training image over the whole training set).",
    ]
    null = s.get("same_caption_ssim")
    if null:
        lines[-1] += (
            f" The threshold lies above the SSIM of every pair of distinct generic training images of one caption "
            f"({null['pairs']:,} pairs: at most {null['max']:.2f}, 99.9 % under {null['q0.999']:.2f}), "
            "so a replicating generation is closer to a training image than two different scenes of one caption are."
        )
    nan = float("nan")
    lines += [
        "",
        "| target | measured |",
        "|---|---|",
        f"| verbatim captions with >= 75 % of seeds replicating their image (target >= 90 %{pooled}) | "
        f"{s.get('verbatim_replicated_3of4', nan):.0%} (seeds: {s.get('verbatim_seed_replication_rate', nan):.0%}) |",
        f"| held-out captions with no replicating seed (target >= 90 %) | {s.get('heldout_no_replication', nan):.0%} |",
        f"| template generations replicating one of their own training images | {s.get('template_seed_replication_rate', nan):.0%} |",
        f"| generic generations replicating one of their own training images | {s.get('generic_seed_replication_rate', nan):.0%} |",
        "",
        "| window | positives vs held-out | AUC | TPR@1%FPR | threshold |",
        "|---|---|---|---|---|",
    ]
    for name, d in s["detection"].items():
        for pair, m in d.items():
            lines.append(
                f"| {name} | {pair.replace('_vs_heldout', '')} ({m['n_positive']} vs {m['n_negative']}) | "
                f"{m['auc']:.3f} | {m['tpr_at_1pct_fpr']:.2f} | {m['threshold']:.3f} |"
            )
    dose = dose_response_markdown(s)
    if dose:
        lines += [
            "",
            "Dose-response (verbatim images by copy count; replication = a generation at SSIM >= "
            f"{s['replication_threshold']:.2f} to its own image; trigger prompts: a generation whose nearest "
            "training image is the one the prompt was derived from, at SSIM >= the threshold):",
            "",
            dose,
        ]
    lines += ["", "SSIM quantiles (0 / 10 / 50 / 90 / 100 %):", ""]
    for k, q in s["ssim_quantiles"].items():
        lines.append(f"- {k}: " + " / ".join(f"{v:.2f}" for v in q.values()))
    ceiling = s.get("autoencoder_ceiling") or {}
    if ceiling:
        values = sorted(ceiling.values())
        low = ", ".join(
            f"{k.removeprefix('verbatim-')} {v:.2f}"
            for k, v in sorted(ceiling.items(), key=lambda kv: kv[1])[:3]
        )
        lines += [
            "",
            f"Autoencoder ceiling (SSIM of each verbatim image to its own encode-decode round trip, what a perfect "
            f"latent copy reaches): {values[0]:.2f}-{values[-1]:.2f}, median {values[len(values) // 2]:.2f}; lowest: {low}.",
        ]
    return "\n".join(lines)


@register_evaluation
class OrganismBench(Evaluation):
    name = "organism"
    help = "the organism's measured ground truth: replication per caption role, detection, dose-response by copies"
    default_out = "runs/organism-eval"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--seeds", type=int, default=4)
        add("--steps", type=int, default=None, help="default: the recipe's")
        add(
            "--write-calibration",
            action="store_true",
            help="store the first-step threshold in the model folder",
        )
        add("--copy-histogram", action="store_true", help="copy the histogram into the model folder")
        add(
            "--write-card",
            default=None,
            metavar="TRAIN_LOG",
            help="write the model card (README.md) from this train-log.json and the measurements",
        )
        add("--notes", default="", help="file with notes on how this model was trained (for the card)")

    def check(self) -> None:
        self.model = self.args.model or default_model()
        if self.model is None:
            raise ValueError("--model: no organism: train it (diffmem organism train) or pass --model")

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        args, model, t0 = self.args, self.model, time.time()
        results = run_evaluation(model, args.out, seeds=args.seeds, steps=args.steps)
        seconds = time.time() - t0
        out = Path(args.out)
        gens = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
        hist = ssim_histogram_png(
            gens, results["summary"]["replication_threshold"], out / "ssim_histogram.png"
        )
        if args.copy_histogram:
            shutil.copy2(hist, Path(model) / "ssim_histogram.png")
        if args.write_calibration:
            first_step_calibration(load_model(), results).save_pretrained(model)
        text = organism_markdown(results, seconds)
        if args.write_card:
            log = json.loads(Path(args.write_card).read_text())
            notes = Path(args.notes).read_text() if args.notes else ""
            recipe = OrganismRecipe.from_dict(log["recipe"])
            atomic_write_text(Path(model) / "README.md", model_card(model, recipe, log, text, notes))
        return EvaluationResult(results, results["summary_text"] + "\n\n" + text, [str(hist)])
