"""``diffmem embed``: a training set's images into clip-retrieval's embedding layout, once, for many scans."""

from __future__ import annotations

import argparse

from diffmem.commands.options import (
    DATA_HELP,
    add_data_column_arguments,
    add_embedder_arguments,
)
from diffmem.embed import embedder_from_settings
from diffmem.io import check_out_path
from diffmem.modelio import check_device
from diffmem.scan.embedding import embed_dataset
from diffmem.scan.procs import Procs

NAME = "embed"
HELP = (
    "Embed a training set's images into clip-retrieval's layout (img_emb/img_emb_NNNN.npy + "
    "metadata/metadata_NNNN.parquet), shard by shard: rerun to resume; split over processes with "
    "`accelerate launch --num_processes N -m diffmem embed ...`. Search it with `diffmem scan "
    "--train-embeddings DIR`, or index it with `diffmem index`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        help=DATA_HELP,
    )
    p.add_argument("--out", required=True, help="the embedding folder (rerun the same command to resume)")
    p.add_argument("--shard-size", type=int, default=1024, help="images per shard file (default 1024)")
    p.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float16",
        help="stored precision of the descriptors (default float16, as LAION's released embeddings)",
    )
    p.add_argument("--device", default=None, help="torch device of the embedder (default: the process's)")
    add_embedder_arguments(p)
    add_data_column_arguments(p, labels=False)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:

    check_out_path(args.out)
    device = check_device(args.device) or Procs().device
    embedder = embedder_from_settings(args, device=str(device))
    summary = embed_dataset(
        args.data,
        args.out,
        embedder,
        shard_size=args.shard_size,
        dtype=args.dtype,
        convert_modes=args.convert_modes,
        id_column=args.id_column,
        caption_column=args.caption_column,
        image_column=args.image_column,
        progress=not args.no_progress,
    )
    if summary is None:  # not the main process
        return 0
    for k in ("vectors", "vectors_without_caption", "dim", "shards", "rows_read", "bad_rows", "images_per_s"):
        print(f"{k}: {summary[k]}")
    if summary["bad_rows_by_reason"]:
        print("bad rows by reason:", ", ".join(f"{k}={v}" for k, v in summary["bad_rows_by_reason"].items()))
    print(f"embeddings: {args.out} (summary: {args.out}/embed_summary.json)")
    return 0
