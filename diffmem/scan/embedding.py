"""Embed the images of a catalog into a clip-retrieval layout, shard by shard (resumable, split over
processes: shard ``k`` goes to process ``k % world``). One code path for ``diffmem embed`` and for the
training side of a scan that embeds its own ``--data``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffmem.data import check_record
from diffmem.io import atomic_write_json, remove_stale_temporaries
from diffmem.records import Record
from diffmem.scan.bad_rows import bad_table, read_bad
from diffmem.scan.catalog import Catalog, build_catalog
from diffmem.scan.layout import (
    FORMAT,
    LAYOUT_FOLDERS,
    EmbeddingLayout,
    LayoutWriter,
    metadata_schema,
    write_record,
)
from diffmem.scan.procs import Procs, progress_bar

#: the float types a layout may store (clip-retrieval's released embeddings are float16)
LAYOUT_DTYPES = ("float16", "float32")


def embed_catalog(
    catalog: Catalog,
    root: Path,
    embedder,
    procs: Procs,
    *,
    dtype: str = "float16",
    convert_modes: bool = False,
    progress: bool = True,
) -> None:
    """Embed this process's catalog shards that are not yet in the layout at ``root`` (the progress
    bar shows images/s)."""
    import pyarrow as pa

    if dtype not in LAYOUT_DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(LAYOUT_DTYPES)}, got {dtype!r}")
    writer = LayoutWriter(root)
    todo = [k for k in procs.mine(catalog.n_shards) if not writer.done(k)]
    rows_todo = sum(catalog.file.metadata.row_group(k).num_rows for k in todo)
    bar = progress_bar(None, rows_todo, "embedding images", progress and procs.main, unit="img")
    with bar:
        for k in todo:
            rows = catalog.shard(k, ["row", "id", "caption", "image"])
            images, kept, bad = [], [], []
            for r in rows:
                image, badrow = check_record(
                    Record(r["id"], "-", Path(r["image"]), r["row"]), convert_modes=convert_modes
                )
                if badrow is None:
                    images.append(image)
                    kept.append(r)
                else:
                    bad.append(read_bad(badrow, stage="image"))
            emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
            metadata = pa.Table.from_pylist(
                [
                    {"image_path": r["image"], "caption": r["caption"], "id": r["id"], "row": r["row"]}
                    for r in kept
                ],
                schema=metadata_schema(),
            )
            writer.write_shard(k, emb.astype(dtype), metadata, bad_table(bad))
            bar.update(len(rows))


def embed_dataset(
    data: str,
    out: str | Path,
    embedder,
    *,
    shard_size: int = 1024,
    dtype: str = "float16",
    convert_modes: bool = False,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    progress: bool = True,
) -> dict | None:
    """``diffmem embed``: the images of ``data`` into a clip-retrieval layout at ``out`` (catalog first,
    then shard by shard; rerun to resume). Returns the summary on the main process, ``None`` elsewhere."""
    from collections import Counter

    import pyarrow.parquet as pq

    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"--shard-size: expected an integer >= 1, got {shard_size!r}")
    if dtype not in LAYOUT_DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(LAYOUT_DTYPES)}, got {dtype!r}")
    root = Path(out)
    procs = Procs()
    t0 = time.perf_counter()
    if procs.main:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries([root, *(root / d for d in LAYOUT_FOLDERS)])  # of a killed run
        record = {
            "format": FORMAT,
            "embedder": embedder.describe(),
            "dtype": dtype,
            "data": str(Path(data).resolve()),
            "shard_size": shard_size,
            "columns": {"id": id_column, "caption": caption_column, "image": image_column},
            "convert_modes": convert_modes,
        }
        write_record(root, record)
        if not (root / "catalog.parquet").is_file():
            build_catalog(
                data,
                root,
                shard_size=shard_size,
                id_column=id_column,
                caption_column=caption_column,
                image_column=image_column,
                require_caption=False,  # the training side needs the image; a missing caption is null
            )
    procs.barrier()
    catalog = Catalog(root)
    if catalog.n_rows == 0:
        reasons = Counter(b["reason"] for b in pq.read_table(root / "bad_rows.parquet").to_pylist())
        raise ValueError(
            f"--data: {data} has no row with an image to embed "
            f"({', '.join(f'{n} {r}' for r, n in sorted(reasons.items())) or 'no rows'})"
        )
    writer = LayoutWriter(root)
    rows_todo = sum(
        catalog.file.metadata.row_group(k).num_rows for k in range(catalog.n_shards) if not writer.done(k)
    )
    procs.barrier()  # every process has counted the work before any of it is done
    t_embed = time.perf_counter()
    embed_catalog(catalog, root, embedder, procs, dtype=dtype, convert_modes=convert_modes, progress=progress)
    procs.barrier()
    embed_s = time.perf_counter() - t_embed
    if not procs.main:
        return None
    layout = EmbeddingLayout(root, argument="--out")
    bad = pq.read_table(root / "bad_rows.parquet").to_pylist() + layout.bad_images()
    seconds = time.perf_counter() - t0
    summary = {
        "embeddings": str(root.resolve()),
        "vectors": layout.ntotal,
        "dim": layout.dim,
        "dtype": dtype,
        "shards": len(layout.shards),
        "rows_read": catalog.n_rows + sum(b["stage"] == "read" for b in bad),
        "bad_rows": len(bad),
        "bad_rows_by_reason": dict(sorted(Counter(b["reason"] for b in bad).items())),
        "vectors_without_caption": layout.metadata_column("caption").null_count if layout.ntotal else 0,
        "processes": procs.world,
        "images_this_run": rows_todo,
        "embed_seconds": round(embed_s, 3),
        "images_per_s": round(rows_todo / embed_s, 3) if rows_todo and embed_s > 0 else None,
        "seconds": round(seconds, 3),
    }
    atomic_write_json(root / "embed_summary.json", summary)
    if layout.ntotal == 0:
        reasons = ", ".join(f"{k}={v}" for k, v in summary["bad_rows_by_reason"].items()) or "none"
        raise ValueError(
            f"--data: {data} has no usable row: {summary['rows_read']} read, {len(bad)} bad (by reason: {reasons}); "
            f"the bad rows are listed in {root / 'bad_rows.parquet'} and {root / 'bad_images'}"
        )
    return summary
