"""``diffmem detect``: score prompts for memorization from the first denoising step(s), without generating images.

Prompts come from a ``.txt`` file (one per line; blank lines are skipped) or a ``.jsonl`` / ``.csv``
table with a caption column. Scores are written as JSONL or CSV (by the ``--out`` suffix), atomically
after every chunk, so an interrupted run resumes where it stopped. With ``--labels COLUMN`` (1 =
memorized) it prints AUC, TPR@1%FPR, accuracy and the threshold (Wen et al.'s definitions);
``--save-calibration MODEL_DIR`` then stores that threshold with the conditions it holds under
(window, schedule, resolution, guidance, model fingerprint) as ``MODEL_DIR/diffmem_calibration.json``,
which the guarded pipelines read back to fill ``memorized`` with no threshold passed. Without labels,
``--fpr RATE --save-calibration MODEL_DIR`` takes the prompts as ordinary ones (a deployer's own traffic,
COCO captions) and stores the threshold that flags at most ``RATE`` of their images, with the rate it
has there, its Wilson interval and the number of prompts and images it rests on. ``--detector`` scores with
another detector the guarded pipeline can read from its own loop (``broken-memories``, ``dsm``, at their
default settings); the calibration then records it, and the pipeline flags with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.commands.options import add_runtime_arguments, check_runtime_arguments, load_model, resolution
from diffmem.detect import calibrate, score_to_file
from diffmem.detectors.trajectory import loop_detector_names
from diffmem.guard.calibrate import fpr_calibration, labelled_calibration
from diffmem.prompt_sets import read_prompt_file
from diffmem.scores.detection import DetectionMetrics

NAME = "detect"
HELP = (
    "Score prompts for memorization from the first denoising step(s) (Wen et al.'s noise gap, or --detector)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    parser.add_argument("--prompts", required=True, help="prompts: .txt (one per line), .jsonl or .csv")
    parser.add_argument("--out", required=True, help="results file: .jsonl or .csv (resumed if it exists)")
    parser.add_argument(
        "--caption-column", default="caption", help="caption column of a .jsonl/.csv (default: caption)"
    )
    parser.add_argument(
        "--id-column", default=None, help="id column (default: the row number); ids seed the noise"
    )
    parser.add_argument(
        "--labels", default=None, metavar="COLUMN", help="label column (1/true = memorized): calibrate"
    )
    parser.add_argument(
        "--num-gens", type=int, default=4, help="generations (noise draws) per prompt (default 4)"
    )
    parser.add_argument(
        "--detector",
        default="wen",
        choices=["wen", *loop_detector_names()],
        help="the score (default wen: the noise gap); broken-memories and dsm read only the sampling loop, "
        "so the guarded pipeline flags with them at no extra UNet call",
    )
    parser.add_argument("--start", type=int, default=0, help="first step of the window (default 0; wen)")
    parser.add_argument(
        "--steps", type=int, default=1, help="end of the step window, exclusive (default 1: first step; wen)"
    )
    parser.add_argument(
        "--num-inference-steps", type=int, default=50, help="length of the schedule (default 50)"
    )
    parser.add_argument(
        "--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)"
    )
    parser.add_argument(
        "--save-calibration",
        default=None,
        metavar="MODEL_DIR",
        help="with --labels, or --fpr: write the threshold and its conditions to MODEL_DIR/diffmem_calibration.json",
    )
    parser.add_argument(
        "--fpr",
        type=float,
        default=None,
        metavar="RATE",
        help="with --save-calibration and no --labels: the prompts are ordinary ones (not memorized); the threshold "
        "flags at most this fraction of their images (e.g. 0.01)",
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per UNet batch (default 8)")
    parser.add_argument(
        "--chunk", type=int, default=64, help="prompts between two writes of --out (default 64)"
    )
    add_runtime_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    if Path(args.out).suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--out: {Path(args.out)} must end in .jsonl or .csv")
    if args.detector != "wen" and (args.start, args.steps) != (0, 1):
        raise ValueError(
            f"--start/--steps: the window of --detector wen; {args.detector} reads its own first sampling steps"
        )
    if not 0 <= args.start < args.steps <= args.num_inference_steps:
        raise ValueError(
            f"--start/--steps: expected 0 <= start < steps <= --num-inference-steps={args.num_inference_steps}, "
            f"got start={args.start}, steps={args.steps}"
        )
    if args.fpr is not None:
        if args.labels is not None or args.save_calibration is None:
            raise ValueError(
                "--fpr: calibrates on ordinary prompts: give it with --save-calibration and without --labels"
            )
        if not 0 < args.fpr < 1:
            raise ValueError(f"--fpr: expected a rate 0 < RATE < 1, got {args.fpr}")
    if args.save_calibration is not None:
        if args.labels is None and args.fpr is None:
            raise ValueError(
                "--save-calibration: needs --labels COLUMN (labelled prompts) or --fpr RATE (ordinary prompts: "
                "the threshold at that false-positive rate)"
            )
        if not Path(args.save_calibration).is_dir():
            raise FileNotFoundError(f"--save-calibration: {args.save_calibration} is not a folder")
    check_runtime_arguments(args)


def run(args: argparse.Namespace) -> int:
    _check(args)
    rows = read_prompt_file(args.prompts, args.caption_column, args.id_column, args.labels)
    pipe = load_model(args)
    height, width = resolution(args, pipe)
    results = score_to_file(
        pipe,
        rows,
        args.out,
        num_gens=args.num_gens,
        window=(args.start, args.steps) if args.detector == "wen" else None,
        detector=args.detector,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        chunk=args.chunk,
        height=height,
        width=width,
        dtype=args.dtype,
        progress=not args.no_progress,
    )
    print(f"wrote {len(rows)} scores to {Path(args.out)}")
    scheduler = type(pipe.scheduler).__name__
    if args.fpr is not None:
        _save_fpr_calibration(args, results, scheduler)
    if args.labels is not None and args.save_calibration is None:
        _print_metrics(calibrate([r["score"] for r in results], [r["label"] for r in results]))
    elif args.labels is not None:
        data = f"{Path(args.prompts).name}, labels in column {args.labels!r} (diffmem detect)"
        calibration, per_prompt, per_image = labelled_calibration(results, scheduler, data)
        _print_metrics(per_prompt)
        print(
            f"per image ({per_image.n_positive} memorized, {per_image.n_negative} not): AUC {per_image.auc:.4f}  "
            f"TPR@1%FPR {per_image.tpr_at_1pct_fpr:.4f}  threshold {per_image.threshold:.6g}"
        )
        print(f"wrote the calibration to {calibration.save_pretrained(args.save_calibration)}")
    return 0


def _print_metrics(metrics: DetectionMetrics) -> None:
    print(
        f"AUC {metrics.auc:.4f}  TPR@1%FPR {metrics.tpr_at_1pct_fpr:.4f}  accuracy {metrics.accuracy:.4f}  "
        f"threshold {metrics.threshold:.6g}  ({metrics.n_positive} memorized, {metrics.n_negative} not)"
    )


def _save_fpr_calibration(args: argparse.Namespace, results: list[dict], scheduler: str) -> None:
    """The threshold at ``--fpr`` on ordinary prompts, printed with the rate it has there, and saved."""
    data = f"{Path(args.prompts).name}, ordinary prompts (diffmem detect --fpr)"
    calibration, achieved = fpr_calibration(results, scheduler, args.fpr, data)
    lo, hi = achieved["fpr_ci95"]
    print(
        f"threshold {achieved['threshold']:.6g} at target FPR {args.fpr:g}: {achieved['images_flagged']} of "
        f"{achieved['n_images']} images flagged, FPR {achieved['fpr']:.4f} [{lo:.4f}, {hi:.4f}] (95 % Wilson); "
        f"{achieved['prompts_flagged']} of {achieved['n_prompts']} prompts"
    )
    if args.fpr * achieved["n_images"] < 1:
        print(
            f"note: {achieved['n_images']} images cannot show a rate of {args.fpr:g} (fewer than 1 / FPR); "
            "the threshold is above every score seen"
        )
    print(f"wrote the calibration to {calibration.save_pretrained(args.save_calibration)}")
