"""``diffmem prune``: find a WeightMask of FFN weights that carry memorization (subspace pruning) and apply it."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline

from diffmem.commands.options import add_runtime_arguments, check_runtime_arguments, load_model, resolution
from diffmem.localize.prune_folder import prune_to_folder
from diffmem.prompt_sets import read_prompt_file

NAME = "prune"
HELP = (
    "Subspace pruning (Chavhan et al. 2024): locate FFN weights that memorized prompts use and reference "
    "prompts do not; write a WeightMask and, with --save-model, the pruned model."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    p.add_argument(
        "--memorized",
        required=True,
        help="memorized prompts: a .txt file (one per line) or a .csv/.jsonl/.parquet table with a caption column",
    )
    p.add_argument(
        "--reference",
        default=None,
        help="reference prompts, same formats (default: the empty prompt, as many times as memorized prompts)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ratio", type=float, default=0.01, help="top fraction per row, ρ (default 0.01)")
    p.add_argument("--tau", type=int, default=10, help="first τ denoising steps united (default 10)")
    p.add_argument(
        "--select-ratio", type=float, default=0.0, help="keep weights selected in > s·τ steps (default 0)"
    )
    p.add_argument(
        "--max-layer-fraction", type=float, default=None, help="cap on each layer's pruned fraction"
    )
    p.add_argument("--steps", type=int, default=50, help="denoising steps of the generations (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--cond-only", action="store_true", help="statistics from the conditional CFG half only")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(p)
    p.add_argument("--fp16", dest="dtype", action="store_const", const="float16", help=argparse.SUPPRESS)
    p.add_argument("--save-model", action="store_true", help="also write the pruned model to OUT/model")


def run(args: argparse.Namespace) -> int:
    memorized = [r["prompt"] for r in read_prompt_file(args.memorized, None, argument="--memorized")]
    reference = (
        [r["prompt"] for r in read_prompt_file(args.reference, None, argument="--reference")]
        if args.reference
        else None
    )
    if args.tau < 1 or args.tau > args.steps:
        raise ValueError(f"--tau must be between 1 and --steps ({args.steps}), got {args.tau}")
    if not 0 < args.ratio <= 1:
        raise ValueError(f"--ratio must be in (0, 1], got {args.ratio}")
    check_runtime_arguments(args)
    pipe = load_model(args, StableDiffusionPipeline)
    height, width = resolution(args, pipe)
    summary = prune_to_folder(
        pipe,
        memorized,
        reference,
        args.out,
        model=args.model,
        save_model=args.save_model,
        ratio=args.ratio,
        tau=args.tau,
        select_ratio=args.select_ratio,
        max_layer_fraction=args.max_layer_fraction,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        cond_only=args.cond_only,
        seed=args.seed,
        batch_size=args.batch_size,
        height=height,
        width=width,
    )
    layers = summary["layers"]
    print(
        f"pruned {summary['num_pruned']} weights ({100 * summary['pruned_fraction_of_ffn_layers']:.3f}% of "
        f"{len(layers)} FFN layers); mask: {Path(args.out) / 'weight_mask.safetensors'}"
    )
    for row in layers:
        print(f"  {row['layer']}: {100 * row['pruned_fraction']:.3f}%")
    return 0
