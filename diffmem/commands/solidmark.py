"""``diffmem solidmark key|score|compare|finetune``: keyed training data and per-image memorization scores."""

from __future__ import annotations

import argparse

from diffmem.cli import UsageError
from diffmem.commands.options import add_runtime_arguments, add_training_memory_arguments, load_model
from diffmem.edits import NeuronSet, WeightMask
from diffmem.io import atomic_write_json
from diffmem.pipelines import SolidMarkOutpaintPipeline
from diffmem.solidmark.keying import key_dataset
from diffmem.solidmark.mitigations import gaussian_embedding_noise
from diffmem.solidmark.run import load_score_items, run_score
from diffmem.solidmark.scoring import read_rows
from diffmem.solidmark.summary import compare_runs
from diffmem.train.keyed_finetune import FinetuneConfig, finetune_keyed

NAME = "solidmark"
HELP = "SolidMark: key a dataset, fine-tune on it, score memorization per image by outpainting the key"


def _deltas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"every delta must be in (0, 1], got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="solidmark_command", metavar="<step>")

    p = sub.add_parser(
        "key", help="frame every image of a dataset with a seeded random key; write a key manifest"
    )
    p.add_argument("--data", required=True, help="image folder (metadata.jsonl/csv/parquet) or table")
    p.add_argument(
        "--out", required=True, help="folder for the keyed images, metadata.jsonl and the manifest"
    )
    p.add_argument(
        "--frame-width", type=int, default=16, help="frame width in pixels (default 16, the paper's)"
    )
    p.add_argument(
        "--value-space",
        choices=("pixel", "model"),
        default="pixel",
        help="key k is the frame's pixel value in [0,1] (default) or its value in the model's [-1,1] space",
    )
    p.add_argument("--seed", type=int, default=42, help="key seed (default 42, the paper's)")
    p.add_argument(
        "--pattern", choices=("border", "center"), default="border", help="padded frame or centre square"
    )
    p.add_argument(
        "--share-duplicate-keys",
        action="store_true",
        help="copies of one image (same pixels) share one key (default: a fresh key per copy, as the paper)",
    )
    p.add_argument(
        "--size", type=int, default=None, help="centre-crop and resize so every keyed image is SIZE px"
    )
    p.add_argument("--id-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--image-column", default=None)

    p = sub.add_parser("score", help="outpaint every image's key and score |mean frame - key| (resumable)")
    p.add_argument("--model", default=None, help="Stable Diffusion folder (default: the model organism)")
    p.add_argument("--data", required=True, help="the keyed dataset (written by `diffmem solidmark key`)")
    p.add_argument("--manifest", default=None, help="its key manifest (default DATA/solidmark_manifest.json)")
    p.add_argument("--out", required=True, help="run folder (scores.csv/.parquet, summary.json, report.html)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (default 100, the paper's)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance (default 3)")
    p.add_argument(
        "--generations",
        type=int,
        default=1,
        help="generations per image (the paper's duplication study: 10); with more than one, the summary "
        "also rates each image by its key averaged over them (images.csv); more extend a finished run",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument(
        "--deltas", type=_deltas, default=[0.1, 0.05, 0.005], help="thresholds (default 0.1,0.05,0.005)"
    )
    p.add_argument(
        "--group-column", default=None, help="also report rates per value of this column (e.g. role)"
    )
    p.add_argument(
        "--where", action="append", default=[], metavar="COL=VALUE", help="score only matching rows"
    )
    p.add_argument("--one-per-group", action="store_true", help="score one copy of each distinct image")
    p.add_argument("--sample", type=int, default=None, help="score a seeded random sample of N images")
    p.add_argument(
        "--random-init", action="store_true", help="baseline: the same UNet architecture, freshly initialized"
    )
    p.add_argument(
        "--neurons", action="append", default=[], help="NeuronSet JSON to switch off while scoring (NeMo)"
    )
    p.add_argument(
        "--weight-mask", action="append", default=[], help="pruning WeightMask file to apply while scoring"
    )
    p.add_argument(
        "--gni", type=float, default=None, metavar="SIGMA", help="Gaussian noise on the text embedding"
    )
    p.add_argument(
        "--baseline-run", default=None, help="a run folder to compare with (difference with its interval)"
    )
    p.add_argument(
        "--save-maps", action="store_true", help="save per-pixel frame distance maps (pixel-level variant)"
    )
    p.add_argument(
        "--save-images", action="store_true", help="save the outpainted images (shown in the report)"
    )
    add_runtime_arguments(p, size=False)  # the keyed images fix the size

    p = sub.add_parser(
        "compare", help="difference of memorization rates between a run and its baseline, with intervals"
    )
    p.add_argument("--run", required=True, help="run folder (e.g. with a mitigation)")
    p.add_argument("--baseline", required=True, help="baseline run folder (same images, no mitigation)")
    p.add_argument("--deltas", type=_deltas, default=[0.1, 0.05, 0.005])
    p.add_argument(
        "--level",
        choices=("generation", "image"),
        default="generation",
        help="compare per generation, or per image with its key averaged over its generations",
    )
    p.add_argument("--out", default=None, help="write comparison.json here (default: print only)")

    p = sub.add_parser(
        "finetune",
        help="fine-tune a Stable Diffusion folder's UNet on a keyed dataset (resumable; mixed precision: "
        "accelerate launch --mixed_precision bf16 -m diffmem solidmark finetune ...)",
    )
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder to start from (default: the model organism)"
    )
    p.add_argument("--data", required=True, help="the keyed dataset")
    p.add_argument("--workdir", required=True, help="checkpoints and logs; rerun to resume")
    p.add_argument("--out", default=None, help="fine-tuned pipeline folder (default WORKDIR/model)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4, the paper's)")
    p.add_argument(
        "--lr-scheduler",
        default="constant",
        help="learning-rate schedule, a diffusers get_scheduler name (default constant, the paper's; "
        "linear or cosine decay to 0)",
    )
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--train-text-encoder", action="store_true", help="also train the text encoder")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    add_training_memory_arguments(p)


def run(args: argparse.Namespace) -> int:

    step = getattr(args, "solidmark_command", None)
    if step == "key":
        return _key(args)
    if step == "score":
        return _score(args)
    if step == "compare":
        return _compare(args)
    if step == "finetune":
        return _finetune(args)
    raise UsageError("choose a step: key, score, compare or finetune")


def _key(args) -> int:

    result = key_dataset(
        args.data,
        args.out,
        frame_width=args.frame_width,
        value_space=args.value_space,
        seed=args.seed,
        pattern=args.pattern,
        duplicate_keys="shared" if args.share_duplicate_keys else "fresh",
        size=args.size,
        id_column=args.id_column,
        caption_column=args.caption_column,
        image_column=args.image_column,
    )
    m = result.manifest
    print(
        f"keyed {len(m.entries)} images ({len({e.group for e in m.entries})} distinct) into {result.folder}; "
        f"manifest {result.manifest_path}"
        + (f"; {len(result.bad_rows)} row(s) set aside, see bad_rows.jsonl" if result.bad_rows else "")
    )
    return 0


def _load_edits(args, unet) -> list:
    edits = []
    for path in args.neurons:
        edit = NeuronSet.load(path)
        edit.validate(unet)
        edits.append(edit)
    for path in args.weight_mask:
        edit = WeightMask.load(path, argument="--weight-mask")
        edit.validate(unet)
        edits.append(edit)
    return edits


def _prompt_mitigation(args):
    if args.gni is None:
        return None

    return gaussian_embedding_noise(args.gni)


def _score(args) -> int:
    from pathlib import Path

    manifest_path = args.manifest or str(Path(args.data) / "solidmark_manifest.json")
    where = {}
    for cond in args.where:
        if "=" not in cond:
            raise ValueError(f"--where {cond!r}: expected COLUMN=VALUE")
        k, v = cond.split("=", 1)
        where[k] = v
    manifest, items = load_score_items(
        args.data,
        manifest_path,
        where=where,
        one_per_group=args.one_per_group,
        sample=args.sample,
        seed=args.seed,
    )

    pipe = load_model(args, SolidMarkOutpaintPipeline)
    summary = run_score(
        pipe,
        manifest,
        items,
        args.out,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        generations=args.generations,
        seed=args.seed,
        batch_size=args.batch_size,
        deltas=args.deltas,
        group_column=args.group_column,
        random_init=args.random_init,
        edits=_load_edits(args, pipe.unet),
        prompt_mitigation=_prompt_mitigation(args),
        baseline_run=args.baseline_run,
        save_maps=args.save_maps,
        save_images=args.save_images,
        run_info={
            "model": args.model or "(default organism)",
            "data": str(args.data),
            "manifest": manifest_path,
        },
    )
    _print_rates(summary)
    print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def _print_rates(summary: dict) -> None:
    def line(label, e):
        s = (
            f"  {label:<28} δ={e['delta']:<6g} {e['count']:>5}/{e['n']:<5} = {e['rate']:.3f} "
            f"[{e['ci_low']:.3f}, {e['ci_high']:.3f}]  chance {e['chance']:.4f}"
        )
        if "shuffled_rate" in e:
            s += f"  shuffled keys {e['shuffled_rate']:.3f} [{e['shuffled_ci_low']:.3f}, {e['shuffled_ci_high']:.3f}]"
        return s

    def block_lines(block):
        for e in block["rates"]:
            print(line("all", e))
        for name, g in block.get("groups", {}).items():
            for e in g["rates"]:
                print(line(f"{block['group_column']}={name}", e))

    print(
        f"SolidMark: {summary['n']} generations of {summary['images']} images, mean ℓ {summary['mean_distance']:.4f}"
    )
    block_lines(summary)
    per_image = summary.get("per_image")
    if per_image:
        print(f"per image (k̂ averaged over {per_image['generations']} generations), {per_image['n']} images:")
        block_lines(per_image)
    for c in summary.get("comparison", []) + (per_image or {}).get("comparison", []):
        print(
            f"  vs baseline, per {c['level']:<10} δ={c['delta']:<6g} {c['rate']:.3f} − {c['baseline_rate']:.3f} = {c['difference']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        )


def _compare(args) -> int:
    from pathlib import Path

    runs = {}
    for name in ("run", "baseline"):
        rows = read_rows(getattr(args, name))
        if not rows:
            raise ValueError(f"--{name}: {getattr(args, name)} holds no SolidMark results")
        runs[name] = rows
    table = compare_runs(runs["run"], runs["baseline"], args.deltas, level=args.level)
    for c in table:
        print(
            f"δ={c['delta']:<6g} n={c['n']}: {c['rate']:.3f} − {c['baseline_rate']:.3f} = {c['difference']:+.3f} "
            f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"
        )
    if args.out:
        atomic_write_json(Path(args.out) / "comparison.json", table)
    return 0


def _finetune(args) -> int:

    config = FinetuneConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_scheduler=args.lr_scheduler,
        caption_dropout=args.caption_dropout,
        train_text_encoder=args.train_text_encoder,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
    )
    out = finetune_keyed(args.model, args.data, args.workdir, args.out, config)
    print(f"fine-tuned pipeline saved to {out}")
    return 0
