"""``diffmem memcontrol``: MemControl's search over which UNet transformer blocks a fine-tune may train."""

from __future__ import annotations

import argparse

from diffmem.commands.options import DATA_HELP, add_data_column_arguments
from diffmem.commands.training_options import add_fit_arguments, check_paths_exist, load_data, train_config
from diffmem.data import open_dataset
from diffmem.modelio import load_pipeline, stock_pipeline_class
from diffmem.prompt_sets import read_prompt_file
from diffmem.records import BadRow
from diffmem.train.memcontrol import MemControlConfig, check_search_folder, run_memcontrol
from diffmem.train.text_to_image import load_training_data

NAME = "memcontrol"
HELP = (
    "MemControl (Dutt et al., WACV 2025): an Optuna search (2 objectives: memorization of the memorized rows, "
    "quality on held-out data) over UNet transformer-block masks, each trial a short fine-tune of the masked "
    "blocks; resumable (SQLite); writes pareto.json and trainable_blocks.json."
)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument("--model", default=None, help="Stable Diffusion folder or hub id (default: the organism)")
    p.add_argument("--data", required=True, help=DATA_HELP)
    p.add_argument(
        "--memorized-column",
        default="memorized",
        help="rows with a true value here form the memorization set (default memorized)",
    )
    p.add_argument("--heldout", required=True, help="held-out captioned images for the quality objective")
    p.add_argument(
        "--out", required=True, help="search folder: study.db, trials/, pareto.json (rerun to resume)"
    )
    p.add_argument("--trials", type=int, default=10, help="trials (default 10, the paper's)")
    p.add_argument("--sampler", choices=("nsga2", "random", "tpe"), default="nsga2")
    p.add_argument(
        "--memorization",
        default="noise-gap",
        help="the memorization objective: noise-gap (MemControl's, on the memorized rows' latents), replication "
        "(measured: share of generations from the memorized captions that copy their own image) or a detector "
        "of the registry (diffmem detect --detector) run at generation on the memorized captions (e.g. wen)",
    )
    p.add_argument(
        "--quality",
        choices=("heldout-loss", "caption-fidelity"),
        default="heldout-loss",
        help="the quality objective: the denoising loss on --heldout, or one minus the caption fidelity of "
        "generations from --fidelity-captions (the organism's caption classifier)",
    )
    p.add_argument(
        "--fidelity-captions",
        default=None,
        help="text file, one 'a <colour> <shape>' caption a line, for --quality caption-fidelity "
        "(default: the captions of --heldout)",
    )
    p.add_argument(
        "--generations",
        type=int,
        default=4,
        help="generations per memorized caption (replication, a detector)",
    )
    p.add_argument(
        "--fidelity-generations", type=int, default=1, help="generations per caption of caption-fidelity"
    )
    p.add_argument("--inference-steps", type=int, default=25, help="sampling steps of those objectives")
    p.add_argument(
        "--population", type=int, default=None, help="NSGA-II's population (default: half the trials)"
    )
    p.add_argument("--lr-low", type=float, default=1e-5)
    p.add_argument("--lr-high", type=float, default=1e-3)
    p.add_argument(
        "--full", action="store_true", help="trials train the blocks' weights instead of LoRA adapters"
    )
    add_fit_arguments(p)
    p.set_defaults(steps=200)
    add_data_column_arguments(p, labels=False)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    config = MemControlConfig(
        trials=args.trials, sampler=args.sampler, lr_low=args.lr_low, lr_high=args.lr_high, seed=args.seed,
        memorization=args.memorization, quality=args.quality, generations=args.generations,
        fidelity_generations=args.fidelity_generations, inference_steps=args.inference_steps,
        population=args.population,
    )  # fmt: skip
    config.check()
    check_paths_exist(args, "data", "heldout")
    check_search_folder(args.out)  # before any model loads
    fidelity_captions = (
        [r["prompt"] for r in read_prompt_file(args.fidelity_captions, None, argument="--fidelity-captions")]
        if args.fidelity_captions
        else None
    )
    args.lora = not args.full
    inner = train_config(args)
    inner.check()
    pipe = load_pipeline(args.model, stock_pipeline_class(args.model))
    data = load_data(args, pipe)
    flags = _memorized_flags(args, data)
    rows = [i for i, f in enumerate(flags) if f]
    if not rows:
        raise ValueError(f"--memorized-column: no row of {args.data} has a true {args.memorized_column!r}")
    memorized = data.subset(rows, f"{args.data} ({args.memorized_column})")
    heldout = load_training_data(args.heldout, data.pixels.shape[1])
    result = run_memcontrol(
        args.model, data, memorized, heldout, args.out, config, inner, progress=not args.no_progress,
        fidelity_captions=fidelity_captions,
    )  # fmt: skip
    print(f"Pareto front (memorization: {args.memorization}, quality: {args.quality}, both minimised):")
    for t in result["front"]:
        mark = " <- chosen" if t["number"] == result["chosen"]["number"] else ""
        print(
            f"  trial {t['number']}: {t['memorization']:.4f}, {t['quality_loss']:.4f}, {len(t['blocks'])} blocks{mark}"
        )
    b = result["baseline"]
    print(
        f"base model: {b['memorization']:.4f}, {b['quality_loss']:.4f}; mask written to {args.out}/trainable_blocks.json"
    )
    return 0


def _memorized_flags(args: argparse.Namespace, data) -> list[bool]:
    """The memorized column of each kept row, read again from the dataset (values 1/true/yes)."""

    flags = {}
    for item in open_dataset(args.data, id_column=args.id_column, caption_column=args.caption_column,
                             image_column=args.image_column):  # fmt: skip
        if isinstance(item, BadRow):
            continue
        if args.memorized_column not in item.extra:
            raise ValueError(f"--memorized-column: {args.data} has no column {args.memorized_column!r}")
        flags[item.id] = str(item.extra[args.memorized_column]).strip().lower() in ("1", "true", "yes")
    return [flags[r] for r in data.row_ids]
