"""``diffmem train``: text-to-image fine-tuning of an SD 1.x/2.x model, with a training-time mitigation."""

from __future__ import annotations

import argparse
import json
import os

from diffmem.commands.options import DATA_HELP, add_data_column_arguments, add_training_memory_arguments
from diffmem.io import check_out_path

NAME = "train"
HELP = (
    "Fine-tune a Stable Diffusion model on a captioned dataset (full, chosen transformer blocks, or LoRA), with "
    "a training-time mitigation (--mitigation none|ambient|wen-filter|caption-noise); checkpoints every N steps, "
    "rerun to resume exactly; multi-process with `accelerate launch -m diffmem train ...`."
)


def add_fit_arguments(p: argparse.ArgumentParser) -> None:
    """The options of one fine-tune (shared with ``diffmem memcontrol``'s inner loop)."""
    from diffmem.train.text_to_image import TrainConfig

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    from diffmem.train.mitigations import available_training_mitigations

    p.add_argument("--model", default=None, help="Stable Diffusion folder or hub id (default: the organism)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument("--out", required=True, help="run folder: checkpoints/, model/ (the result), log.json")
    p.add_argument(
        "--mitigation",
        default="none",
        choices=available_training_mitigations(),
        help="training-time mitigation (docs/train.md)",
    )
    p.add_argument(
        "--mitigation-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a mitigation parameter, e.g. tau=2.0 (wen-filter), t_n=100 (ambient); repeatable",
    )
    p.add_argument(
        "--trainable-blocks",
        default=None,
        metavar="FILE",
        help="train only these UNet transformer blocks (the JSON diffmem memcontrol writes)",
    )
    add_fit_arguments(p)
    add_data_column_arguments(p, labels=False)
    p.add_argument("--no-progress", action="store_true")


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
    from pathlib import Path

    for name in names:
        if not Path(getattr(args, name)).exists():
            raise ValueError(f"--{name}: {getattr(args, name)} does not exist")


def train_config(args: argparse.Namespace, **overrides):
    from diffmem.train.text_to_image import TrainConfig

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
    from diffmem.train.text_to_image import load_training_data

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


def run(args: argparse.Namespace) -> int:
    from diffmem.modelio import load_pipeline, stock_pipeline_class
    from diffmem.train.adapters import load_trainable_blocks
    from diffmem.train.mitigations import get_training_mitigation
    from diffmem.train.text_to_image import train_text_to_image

    check_paths_exist(args, "data")
    check_out_path(args.out)
    options = mitigation_options(args.mitigation_arg)
    get_training_mitigation(args.mitigation, options)  # bad parameters are refused before any weight is read
    pipe = load_pipeline(args.model, stock_pipeline_class(args.model))
    blocks = load_trainable_blocks(args.trainable_blocks, pipe.unet) if args.trainable_blocks else None
    config = train_config(
        args,
        mitigation=args.mitigation,
        mitigation_options=options,
        trainable_blocks=None if blocks is None else tuple(blocks),
    )
    config.check()
    data = load_data(args, pipe)
    if data.bad_rows:
        first = data.bad_rows[0]
        print(
            f"set aside {len(data.bad_rows)} row(s); first: row {first['row']}: {first['reason']}: {first['detail']}"
        )
    out = train_text_to_image(args.model, data, args.out, config, pipe=pipe, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # one line for a multi-process launch
        print(f"fine-tuned pipeline saved to {out} ({len(data)} rows, mitigation {args.mitigation})")
    return 0
