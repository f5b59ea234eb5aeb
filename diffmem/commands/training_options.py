"""Options shared by the fine-tuning commands (``diffmem train``, ``diffmem memcontrol``): the fit's
arguments, the data they read and the ``TrainConfig`` they build."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffmem.commands.options import add_training_memory_arguments
from diffmem.train.text_to_image import TrainConfig, load_training_data


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one fine-tune (shared with ``diffmem memcontrol``'s inner loop)."""
    d = TrainConfig()
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="samples per optimizer step, all processes together",
    )
    p.add_argument(
        "--gradient-accumulation",
        type=int,
        default=1,
        help="micro-batches per step and process (same weights, less memory)",
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0: none)")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument(
        "--lr-scheduler", default="constant", help="a diffusers get_scheduler name (default constant)"
    )
    p.add_argument("--caption-dropout", type=float, default=d.caption_dropout)
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (peft), merged into the saved UNet"
    )
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast (weights stay float32)",
    )
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resolution", type=int, default=None, help="training size in px (default: the model's sample size)"
    )
    p.add_argument(
        "--group-column",
        default=None,
        help="rows that copy one image share its value (default: image_id when present); ambient's one noisy copy",
    )
    add_training_memory_arguments(p)


def mitigation_options(pairs: list[str]) -> dict:
    """``["tau=2", "insert_words=1"]`` -> ``{"tau": 2, "insert_words": 1}`` (JSON values, else strings)."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--mitigation-arg: expected KEY=VALUE, got {pair!r}")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def check_paths_exist(args: argparse.Namespace, *names: str) -> None:
    """Refuse a missing ``--data``-like path before any weight is read."""
    for name in names:
        if not Path(getattr(args, name)).exists():
            raise ValueError(f"--{name}: {getattr(args, name)} does not exist")


def train_config(args: argparse.Namespace, **overrides):
    settings = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        gradient_accumulation=args.gradient_accumulation,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        warmup_steps=args.warmup_steps,
        lr_scheduler=args.lr_scheduler,
        caption_dropout=args.caption_dropout,
        train_text_encoder=args.train_text_encoder,
        mode="lora" if args.lora else "full",
        lora_rank=args.lora_rank,
        mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
    )
    return TrainConfig(**{**settings, **overrides})


def load_data(args: argparse.Namespace, pipe):
    """The training data at ``--resolution`` (default: the model's sample size times the VAE factor)."""
    size = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    return load_training_data(
        args.data,
        size,
        id_column=args.id_column,
        caption_column=args.caption_column,
        image_column=args.image_column,
        group_column=args.group_column,
        convert_modes=args.convert_modes,
    )
