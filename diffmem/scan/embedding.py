"""Embed the images of a catalog into a clip-retrieval layout, shard by shard (resumable, split over
processes: shard ``k`` goes to process ``k % world``). One code path for ``diffmem embed`` and for the
training side of a scan that embeds its own ``--data``."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffmem.scan.bad_rows import bad_table
from diffmem.scan.catalog import Catalog
from diffmem.scan.layout import LayoutWriter
from diffmem.scan.procs import Procs, progress_bar

#: the float types a layout may store (clip-retrieval's released embeddings are float16)
LAYOUT_DTYPES = ("float16", "float32")


def metadata_schema():
    import pyarrow as pa

    return pa.schema(
        [("image_path", pa.string()), ("caption", pa.string()), ("id", pa.string()), ("row", pa.int64())]
    )


def embed_catalog(
    catalog: Catalog,
    root: Path,
    embedder,
    procs: Procs,
    *,
    dtype: str = "float16",
    convert_modes: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Embed this process's catalog shards that are not yet in the layout at ``root``; returns
    ``{"images": n, "seconds": s}`` for the images embedded here (the progress bar shows images/s)."""
    from diffmem.data import Record, check_record

    if dtype not in LAYOUT_DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(LAYOUT_DTYPES)}, got {dtype!r}")
    writer = LayoutWriter(root)
    todo = [k for k in procs.mine(catalog.n_shards) if not writer.done(k)]
    rows_todo = sum(catalog.file.metadata.row_group(k).num_rows for k in todo)
    done = 0
    t0 = time.perf_counter()
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
                    bad.append(
                        {"row": r["row"], "id": r["id"], "reason": badrow.reason, "detail": badrow.detail}
                    )
            emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
            import pyarrow as pa

            metadata = pa.Table.from_pylist(
                [
                    {"image_path": r["image"], "caption": r["caption"], "id": r["id"], "row": r["row"]}
                    for r in kept
                ],
                schema=metadata_schema(),
            )
            writer.write_shard(
                k, emb.astype(dtype), metadata, bad_table([{**b, "stage": "image"} for b in bad])
            )
            done += len(rows)
            bar.update(len(rows))
    return {"images": done, "seconds": time.perf_counter() - t0}
