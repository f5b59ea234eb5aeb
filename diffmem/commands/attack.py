"""``diffmem attack``: the Finding Dori attack on a model, a saved edited model, or a model with an edit applied."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers import StableDiffusionPipeline

from diffmem.attack.campaign import attack_targets
from diffmem.attack.dori import DoriConfig
from diffmem.attack.targets import load_targets
from diffmem.commands.edit_options import add_edit_arguments, load_edit
from diffmem.commands.options import (
    add_runtime_arguments,
    add_training_memory_arguments,
    check_runtime_arguments,
    load_model,
    resolution,
)

NAME = "attack"
HELP = (
    "Finding Dori (Kowalczuk et al. 2026): for each (caption, training image) optimize the text embedding "
    "against the frozen, possibly edited model, then generate from it and measure replication."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    p.add_argument(
        "--targets",
        required=True,
        help="targets: an image folder with metadata.jsonl/csv, or a .csv/.jsonl/.parquet table of caption + image path",
    )
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    add_edit_arguments(p)
    p.add_argument("--steps", type=int, default=50, help="Adam steps on the embedding (default 50)")
    p.add_argument("--lr", type=float, default=0.1, help="Adam learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=8, help="(noise, timestep) pairs per step (default 8)")
    p.add_argument("--init", choices=("prompt", "gaussian"), default="prompt")
    p.add_argument("--eps-ball", type=float, default=None, help="optional L2 bound per token on the change")
    p.add_argument("--seeds", type=int, default=4, help="generations per target and setting (default 4)")
    p.add_argument(
        "--gen-steps", type=int, default=50, help="denoising steps of the generations (default 50)"
    )
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="replication: mean SSIM over seeds above this (default 0.5)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="attack only the first N targets")
    add_training_memory_arguments(p, optimizer=False)
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_runtime_arguments(args)
    edit = load_edit(args)
    targets = load_targets(args.targets, limit=args.limit)
    pipe = load_model(args, StableDiffusionPipeline)
    height, width = resolution(args, pipe)
    config = DoriConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        init=args.init,
        eps_ball=args.eps_ball,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    summary = attack_targets(
        pipe,
        targets,
        args.out,
        config,
        edit=edit,
        edit_files={"mask": args.mask, "neurons": args.neurons},
        model=args.model,
        dtype=args.dtype,
        seeds=args.seeds,
        gen_steps=args.gen_steps,
        guidance_scale=args.guidance_scale,
        threshold=args.threshold,
        height=height,
        width=width,
    )
    lo, hi = summary["replication_rate_after_ci"]
    print(
        f"{summary['targets']} targets: replication {summary['replication_rate_before']:.2f} -> "
        f"{summary['replication_rate_after']:.2f} (95 % CI after [{lo:.2f}, {hi:.2f}]; {summary['criterion']}) "
        f"(mean SSIM {summary['similarity_before_mean']:.3f} -> {summary['similarity_after_mean']:.3f}); "
        f"{Path(args.out)}"
    )
    return 0
