"""``diffmem scan``: dataset-wide replication scan (generate, embed, search the training set, report)."""

from __future__ import annotations

import argparse

from diffmem.commands.options import (
    DATA_HELP,
    add_data_column_arguments,
    add_embedder_arguments,
    add_runtime_arguments,
    check_runtime_arguments,
    embedder_settings,
)
from diffmem.scan.runner import ScanConfig, run_scan

NAME = "scan"
HELP = (
    "Scan a training set for replication: first-step memorization score of every caption, generations "
    "(all or the top fraction by score), nearest training image of each, dataset summary and HTML report. "
    "Resumable; split over processes with `accelerate launch --num_processes N -m diffmem scan ...` (one per GPU; on a CPU-only "
    "machine add --multi_gpu, which then runs N CPU processes over gloo)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help=DATA_HELP,
    )
    p.add_argument("--out", required=True, help="scan folder (rerun the same command to resume)")
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id (default: the model organism)"
    )
    p.add_argument(
        "--generate",
        choices=("all", "top", "none"),
        default="all",
        help="generate for all captions, only the --top-fraction by first-step score (two-stage), or none (scores only)",
    )
    p.add_argument(
        "--top-fraction", type=float, default=0.1, help="fraction generated in --generate top (default 0.1)"
    )
    p.add_argument(
        "--num-gens", type=int, default=4, help="generations (and scored seeds) per caption (default 4)"
    )
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="base seed; each generation's seed derives from it and the item id",
    )
    p.add_argument(
        "--shard-size",
        type=int,
        default=64,
        help="usable rows per shard (unit of resumption and of work split)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="captions per pipeline call")
    add_runtime_arguments(
        p, device=False
    )  # the device is the process's: accelerate's, or CUDA when available
    add_embedder_arguments(p)
    s = p.add_argument_group("search")
    s.add_argument(
        "--index",
        choices=("flat", "ivf", "auto", "torch"),
        default="flat",
        help="faiss exact (flat), IVF, auto (IVF past 5M), or torch matmul",
    )
    s.add_argument(
        "--nprobe", type=int, default=16, help="IVF lists searched per query (in-memory --index ivf)"
    )
    s.add_argument(
        "--train-embeddings",
        default=None,
        help="search a prebuilt embedding folder (`diffmem embed`'s, or one clip-retrieval wrote: then add "
        "--train-embedder) instead of embedding --data's images",
    )
    s.add_argument(
        "--train-index",
        default=None,
        help="search a prebuilt faiss index (`diffmem index`, or one built elsewhere, e.g. autofaiss: then give "
        "--train-embeddings and --train-embedder), memory-mapped; its embeddings folder comes from its record",
    )
    s.add_argument(
        "--train-embedder",
        default=None,
        metavar="NAME",
        help="the embedder that made --train-embeddings / --train-index when diffmem did not (a clip-retrieval "
        "folder without embeddings.json, an autofaiss index): this scan's embedder's name or a ':' prefix of it, "
        "e.g. open_clip:ViT-B-32; checked against the vectors' dimension and a few re-embedded images",
    )
    s.add_argument(
        "--index-nprobe",
        type=int,
        default=None,
        help="IVF lists probed per query in --train-index (default: the one in its record)",
    )
    s.add_argument(
        "--rerank",
        type=int,
        default=64,
        help="candidates per generation re-ranked exactly from the stored vectors, with --train-index (default 64)",
    )
    s.add_argument(
        "--background-sample",
        type=int,
        default=10000,
        help="training images in the background distribution (0 = all)",
    )
    s.add_argument(
        "--tiled-l2",
        action="store_true",
        help="Carlini et al.'s tiled-L2 clique check among a caption's generations",
    )
    s.add_argument("--carlini-delta", type=float, default=0.15)
    s.add_argument(
        "--carlini-min-clique", type=int, default=None, help="default min(10, --num-gens), at least 2"
    )
    s.add_argument(
        "--ssim-rerank",
        type=int,
        default=0,
        help="also take the SSIM of each generation to its K nearest training images (copy: SSIM >= 0.5); 0 = off",
    )
    s.add_argument(
        "--keep-images",
        type=int,
        default=8,
        help="generations kept per shard for the report (plus all flagged)",
    )
    d = add_data_column_arguments(p)
    d.add_argument(
        "--all-rows",
        action="store_true",
        help="score and generate for every row (default: once per distinct caption, at its first usable row)",
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-progress", action="store_true")


#: Summary entries printed, in this order (when present).
PRINTED = [
    "rows_read",
    "bad_rows",
    "captions_scored",
    "training_images_without_caption",
    "captions_generated",
    "generations",
    "sim_mean",
    "sim_95pc",
    "bg_95pc",
    "captions_replicated",
    "captions_verbatim",
]


def _config(args: argparse.Namespace) -> ScanConfig:
    return ScanConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        generate=args.generate,
        top_fraction=args.top_fraction,
        num_gens=args.num_gens,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        attention=args.attention,
        **embedder_settings(args),
        index=args.index,
        nprobe=args.nprobe,
        train_embeddings=args.train_embeddings,
        train_index=args.train_index,
        train_embedder=args.train_embedder,
        rerank=args.rerank,
        index_nprobe=args.index_nprobe,
        background_sample=args.background_sample,
        tiled_l2=args.tiled_l2,
        carlini_delta=args.carlini_delta,
        carlini_min_clique=args.carlini_min_clique,
        keep_images=args.keep_images,
        ssim_rerank=args.ssim_rerank,
        id_column=args.id_column,
        caption_column=args.caption_column,
        image_column=args.image_column,
        label_column=args.label_column,
        convert_modes=args.convert_modes,
        unique_captions=not args.all_rows,
        report=not args.no_report,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    check_runtime_arguments(args)
    summary = run_scan(_config(args))
    if summary is None:  # not the main process
        return 0
    for k in PRINTED:
        if k in summary:
            v = summary[k]
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if summary.get("bad_rows_by_reason"):
        print("bad rows by reason:", ", ".join(f"{k}={v}" for k, v in summary["bad_rows_by_reason"].items()))
    print(f"results: {args.out}/summary.json" + ("" if args.no_report else f", {args.out}/report.html"))
    return 0
