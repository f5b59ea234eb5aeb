"""``diffmem train``: text-to-image fine-tuning of an SD 1.x/2.x model, with a training-time mitigation."""

from __future__ import annotations

import argparse
import os

from diffmem.commands.options import DATA_HELP, add_data_column_arguments
from diffmem.commands.training_options import (
    add_fit_arguments,
    check_paths_exist,
    load_data,
    mitigation_options,
    train_config,
)
from diffmem.io import check_out_path
from diffmem.modelio import load_pipeline, stock_pipeline_class
from diffmem.train.adapters import load_trainable_blocks
from diffmem.train.mitigations import available_training_mitigations, get_training_mitigation
from diffmem.train.text_to_image import train_text_to_image

NAME = "train"
HELP = (
    "Fine-tune a Stable Diffusion model on a captioned dataset (full, chosen transformer blocks, or LoRA), with "
    "a training-time mitigation (--mitigation none|ambient|wen-filter|caption-noise); checkpoints every N steps, "
    "rerun to resume exactly; multi-process with `accelerate launch -m diffmem train ...`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:

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


def run(args: argparse.Namespace) -> int:

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
