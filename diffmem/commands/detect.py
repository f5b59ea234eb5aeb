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
has there, its Wilson interval and the number of prompts and images it rests on.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from diffmem.commands.options import add_runtime_arguments, check_runtime_arguments, load_model, resolution
from diffmem.detect import calibrate, score_prompts
from diffmem.fingerprint import model_fingerprint
from diffmem.guard.calibration import GuardCalibration, fpr_summary, threshold_at_fpr
from diffmem.io import atomic_write_text
from diffmem.prompt_sets import read_prompt_file

NAME = "detect"
HELP = "Score prompts for memorization from the first denoising step(s) (Wen et al.'s noise gap)."

SETTINGS = (
    "model_fingerprint",
    "num_gens",
    "window",
    "num_inference_steps",
    "guidance_scale",
    "seed",
    "height",
    "width",
    "dtype",
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
    parser.add_argument("--start", type=int, default=0, help="first step of the window (default 0)")
    parser.add_argument(
        "--steps", type=int, default=1, help="end of the step window, exclusive (default 1: first step)"
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


def read_results(path: Path) -> list[dict]:
    """Rows already in ``--out`` (JSONL or CSV), for resuming."""
    if not path.exists():
        return []
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
        for row in rows:
            for key in ("scores", "window"):
                row[key] = json.loads(row[key])
            for key in ("num_gens", "num_inference_steps", "seed"):
                row[key] = int(row[key])
            row["score"], row["guidance_scale"] = float(row["score"]), float(row["guidance_scale"])
            if row.get("label") not in (None, ""):
                row["label"] = int(row["label"])
            else:
                row.pop("label", None)
        return rows
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_results(path: Path, rows: list[dict]) -> None:

    if path.suffix.lower() == ".csv":
        buf = io.StringIO()
        fields = ["id", "prompt", "score", "scores", "label", *SETTINGS]
        writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "scores": json.dumps(row["scores"]), "window": json.dumps(row["window"])})
        atomic_write_text(path, buf.getvalue())
    else:
        atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def run(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--out: {out} must end in .jsonl or .csv")
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
    rows = read_prompt_file(args.prompts, args.caption_column, args.id_column, args.labels)
    pipe = load_model(args)
    height, width = resolution(args, pipe)
    settings = {
        "model_fingerprint": model_fingerprint(pipe.unet),
        "num_gens": args.num_gens,
        "window": [args.start, args.steps],
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "height": height,
        "width": width,
        "dtype": args.dtype,
    }
    done = {}
    for row in read_results(out):
        if any(row.get(k, "float32" if k == "dtype" else None) != v for k, v in settings.items()):
            raise ValueError(
                f"--out: {out} holds results made with other settings ({ {k: row.get(k) for k in SETTINGS} }); "
                "use another --out or delete it"
            )
        done[row["id"]] = row
    todo = [r for r in rows if r["id"] not in done]
    if done:
        print(f"resuming: {len(done)} of {len(rows)} prompts already scored in {out}")
    from tqdm.auto import tqdm

    with tqdm(
        total=len(rows), initial=len(rows) - len(todo), desc="detect", unit="prompt", disable=args.no_progress
    ) as bar:
        for c in range(0, len(todo), args.chunk):
            part = todo[c : c + args.chunk]
            scores = score_prompts(
                pipe,
                [r["prompt"] for r in part],
                num_gens=args.num_gens,
                window=(args.start, args.steps),
                num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                item_ids=[r["id"] for r in part],
                batch_size=args.batch_size,
                progress=False,
                attention=None,  # load_model set --attention
                height=height,
                width=width,
            )
            for r, s in zip(part, scores.tolist()):
                done[r["id"]] = {**r, "score": sum(s) / len(s), "scores": s, **settings}
            write_results(out, [done[r["id"]] for r in rows if r["id"] in done])
            bar.update(len(part))
    print(f"wrote {len(rows)} scores to {out}")
    if args.fpr is not None:
        path = save_fpr_calibration(args, pipe, [done[r["id"]] for r in rows], height, width, settings)
        print(f"wrote the calibration to {path}")
    if args.labels is not None:
        metrics = calibrate([done[r["id"]]["score"] for r in rows], [r["label"] for r in rows])
        print(
            f"AUC {metrics.auc:.4f}  TPR@1%FPR {metrics.tpr_at_1pct_fpr:.4f}  accuracy {metrics.accuracy:.4f}  "
            f"threshold {metrics.threshold:.6g}  ({metrics.n_positive} memorized, {metrics.n_negative} not)"
        )
        if args.save_calibration is not None:
            # the pipeline flags single images, so the threshold is chosen over single generations
            per_image = calibrate(
                [s for r in rows for s in done[r["id"]]["scores"]],
                [r["label"] for r in rows for _ in range(args.num_gens)],
            )
            print(
                f"per image ({per_image.n_positive} memorized, {per_image.n_negative} not): AUC {per_image.auc:.4f}  "
                f"TPR@1%FPR {per_image.tpr_at_1pct_fpr:.4f}  threshold {per_image.threshold:.6g}"
            )
            path = _calibration(
                args,
                pipe,
                height,
                width,
                settings,
                memorization_threshold=per_image.threshold,
                auc=per_image.auc,
                tpr_at_1pct_fpr=per_image.tpr_at_1pct_fpr,
                n_positive=per_image.n_positive,
                n_negative=per_image.n_negative,
                data=f"{Path(args.prompts).name}, labels in column {args.labels!r} (diffmem detect)",
                extra={"unit": "image", "per_prompt": metrics.to_dict(), "dtype": args.dtype},
            ).save_pretrained(args.save_calibration)
            print(f"wrote the calibration to {path}")
    return 0


def _calibration(
    args: argparse.Namespace, pipe, height: int, width: int, settings, **fields
) -> GuardCalibration:
    """A calibration with the conditions of this ``diffmem detect`` run (window, schedule, size, guidance,
    model, generations, seed) and ``fields`` (threshold, metrics, data)."""
    return GuardCalibration(
        memorization_window=(args.start, args.steps),
        num_inference_steps=args.num_inference_steps,
        scheduler=type(pipe.scheduler).__name__,
        height=height,
        width=width,
        guidance_scale=args.guidance_scale,
        model_fingerprint=settings["model_fingerprint"],
        num_gens=args.num_gens,
        seed=args.seed,
        **fields,
    )


def save_fpr_calibration(
    args: argparse.Namespace, pipe, results: list[dict], height: int, width: int, settings
):
    """The threshold at ``--fpr`` on the per-image scores of ordinary prompts, written to
    ``--save-calibration`` with the rate it has there (images and prompts, Wilson intervals)."""
    scores = [s for r in results for s in r["scores"]]
    prompt_of = [r["id"] for r in results for _ in r["scores"]]
    threshold = threshold_at_fpr(scores, args.fpr)
    achieved = fpr_summary(scores, prompt_of, threshold)
    lo, hi = achieved["fpr_ci95"]
    print(
        f"threshold {threshold:.6g} at target FPR {args.fpr:g}: {achieved['images_flagged']} of "
        f"{achieved['n_images']} images flagged, FPR {achieved['fpr']:.4f} [{lo:.4f}, {hi:.4f}] (95 % Wilson); "
        f"{achieved['prompts_flagged']} of {achieved['n_prompts']} prompts"
    )
    if args.fpr * len(scores) < 1:
        print(
            f"note: {len(scores)} images cannot show a rate of {args.fpr:g} (fewer than 1 / FPR); "
            "the threshold is above every score seen"
        )
    return _calibration(
        args,
        pipe,
        height,
        width,
        settings,
        memorization_threshold=threshold,
        n_positive=0,
        n_negative=len(scores),
        data=f"{Path(args.prompts).name}, ordinary prompts (diffmem detect --fpr)",
        extra={"unit": "image", "method": "fpr", "target_fpr": args.fpr, **achieved, "dtype": args.dtype},
    ).save_pretrained(args.save_calibration)
