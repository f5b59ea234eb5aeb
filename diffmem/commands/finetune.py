"""``diffmem finetune --adversarial``: fine-tune a model so that Dori triggers no longer re-create training images."""

from __future__ import annotations

import argparse

from diffusers import StableDiffusionPipeline

from diffmem.attack.dori import DoriConfig
from diffmem.cli import UsageError
from diffmem.commands.edit_options import add_edit_arguments, load_edit
from diffmem.commands.options import (
    add_runtime_arguments,
    add_training_memory_arguments,
    check_runtime_arguments,
    load_model,
    resolution,
)
from diffmem.train.adversarial import AdversarialConfig
from diffmem.train.dori_finetune import finetune_against_dori, load_targets

NAME = "finetune"
HELP = (
    "Adversarial fine-tuning (Finding Dori): each round attack the current model, teach the triggers to map to "
    "surrogate images, keep quality with the denoising loss on retain data. Resumable."
)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--adversarial", action="store_true", help="adversarial fine-tuning against the Dori attack"
    )
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id to fine-tune (default: the organism)"
    )
    p.add_argument(
        "--targets", required=True, help="memorized targets: caption + training image (folder or table)"
    )
    p.add_argument("--retain", required=True, help="retain data: caption + image (folder or table)")
    p.add_argument(
        "--out", required=True, help="output folder: checkpoints/, model/, surrogates, log (rerun to resume)"
    )
    add_edit_arguments(p)  # the mitigation that makes the surrogate images
    p.add_argument(
        "--rounds", type=int, default=5, help="rounds (one attack + step per target each; default 5)"
    )
    p.add_argument("--steps-per-target", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--adv-weight", type=float, default=1.0)
    p.add_argument("--adv-batch-size", type=int, default=4)
    p.add_argument("--retain-batch-size", type=int, default=4)
    p.add_argument("--retain-limit", type=int, default=None, help="use only the first N retain rows")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of the full UNet")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--attack-steps", type=int, default=50)
    p.add_argument("--attack-lr", type=float, default=0.1)
    p.add_argument("--attack-batch-size", type=int, default=8)
    p.add_argument(
        "--surrogate-steps", type=int, default=50, help="denoising steps of the surrogate generations"
    )
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast of the trained UNet (its master weights stay float32)",
    )
    add_runtime_arguments(
        p,
        dtype_help="autocast precision of the frozen work: surrogate generation, image and caption encoding "
        "(default float32); the weights stay float32 (the UNet is trained), see --mixed-precision",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    add_training_memory_arguments(p)  # checkpointing covers the training and the attacks


def run(args: argparse.Namespace) -> int:
    check_runtime_arguments(args)
    if not args.adversarial:
        raise UsageError("only adversarial fine-tuning is implemented: pass --adversarial")
    targets = load_targets(args.targets, "--targets")
    retain_rows = load_targets(args.retain, "--retain", limit=args.retain_limit)
    edit = load_edit(args)
    pipe = load_model(args, StableDiffusionPipeline, dtype="float32")  # trained: float32 master weights
    config = AdversarialConfig(
        rounds=args.rounds,
        steps_per_target=args.steps_per_target,
        lr=args.lr,
        adv_weight=args.adv_weight,
        adv_batch_size=args.adv_batch_size,
        retain_batch_size=args.retain_batch_size,
        mode="lora" if args.lora else "full",
        lora_rank=args.lora_rank,
        dori=DoriConfig(
            steps=args.attack_steps, lr=args.attack_lr, batch_size=args.attack_batch_size, seed=args.seed
        ),
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
    )

    def report(rnd: int, entry: dict) -> None:
        print(
            f"round {rnd}/{config.rounds}: loss {entry['loss']:.4f} (adversarial {entry['adv']:.4f}, "
            f"retain {entry['retain']:.4f}), attack loss {entry['attack_final_loss']:.4f}"
        )

    model = finetune_against_dori(
        pipe,
        targets,
        retain_rows,
        args.out,
        config,
        size=resolution(args, pipe),
        edit=edit,
        surrogate_steps=args.surrogate_steps,
        guidance_scale=args.guidance_scale,
        dtype=args.dtype,
        resume=not args.no_resume,
        on_round=report,
    )
    print(f"fine-tuned model: {model}")
    return 0
