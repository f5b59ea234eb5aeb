"""``diffmem index``: a faiss index over an embedding folder, for memory-mapped search by ``diffmem scan``."""

from __future__ import annotations

import argparse

from diffmem.io import check_out_path
from diffmem.scan.index_file import INDEX_KINDS, build_index_file
from diffmem.scan.layout import EmbeddingLayout

NAME = "index"
HELP = (
    "Build a faiss index over an embedding folder (`diffmem embed`) without loading it all at once: exact "
    "up to 200,000 vectors, IVF-PQ past that (parameters from the number of vectors), or HNSW. Writes FILE "
    "and FILE.json (the embedder and layout it indexes); search it with `diffmem scan --train-index FILE`."
)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--embeddings", required=True, help="embedding folder (`diffmem embed`'s, or clip-retrieval's)"
    )
    p.add_argument("--out", required=True, help="index file to write (its record goes to FILE.json)")
    p.add_argument(
        "--kind",
        choices=INDEX_KINDS,
        default="auto",
        help="auto: flat up to 200,000 vectors, else ivfpq (4-bit fast-scan IVF-PQ; default); ivfpq8: 8-bit "
        "IVF-PQ, the kind faiss moves to a GPU; hnsw: graph index, held in memory",
    )
    p.add_argument(
        "--train-embedder",
        default=None,
        metavar="NAME",
        help="the embedder that made a folder without embeddings.json (one clip-retrieval wrote); scans of the "
        "index declare the same NAME",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the training sample and k-means")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:

    check_out_path(args.out, folder=False)
    layout = EmbeddingLayout(args.embeddings, argument="--embeddings", declared=args.train_embedder)
    record = build_index_file(layout, args.out, kind=args.kind, seed=args.seed, progress=not args.no_progress)
    print(
        f"index: {args.out} ({record['factory']}, {record['ntotal']} vectors of {record['dim']}, "
        f"{record['bytes'] / 2**20:.1f} MiB, built in {record['build_seconds']:.1f} s)"
    )
    return 0
