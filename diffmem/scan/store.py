"""Scan results as shard files, each committed atomically: a shard is either complete or absent.

Layout under the scan folder::

    scan.json                      the configuration (a rerun must match it)
    catalog.parquet                the usable rows, one parquet row group per shard
    bad_rows.parquet               rows set aside while reading, with reasons
    embeddings/                    training-image descriptors (``diffmem.scan.layout``) and bad images
    image_bad_rows.parquet         training images that failed to load, for rows of this scan
    scores/scores-000000.parquet   first-step scores of shard 0
    gens/gens-000000.parquet       generations of shard 0: nearest training image, similarity, flags
    images/000000/...png           kept generations of shard 0 (written before the shard commits)

A killed scan leaves only whole shards (plus, at worst, stray temporary files and kept images of an
uncommitted shard, which the rerun overwrites); rerunning skips committed shards and recomputes the
rest with the same per-item seeds, so the union is exactly the rows of an uninterrupted scan.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from diffmem.io import atomic_write


class ShardStore:
    """Shard files of one stage (``scores``, ``gens``) in a scan folder."""

    def __init__(self, root: str | os.PathLike, stage: str, suffix: str = ".parquet"):
        self.root = Path(root)
        self.stage = stage
        self.suffix = suffix
        self.folder = self.root / stage

    def path(self, shard: int) -> Path:
        return self.folder / f"{self.stage}-{shard:06d}{self.suffix}"

    def done(self, shard: int) -> bool:
        return self.path(shard).is_file()

    def done_shards(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        out = []
        for p in self.folder.glob(f"{self.stage}-*{self.suffix}"):
            stem = p.name[len(self.stage) + 1 : -len(self.suffix)]
            if stem.isdigit():
                out.append(int(stem))
        return sorted(out)

    # parquet shards -----------------------------------------------------------------------------
    def write_table(self, shard: int, table) -> Path:
        """Commit a pyarrow table as shard ``shard`` (temporary file, fsync, rename)."""
        import pyarrow.parquet as pq

        return atomic_write(self.path(shard), lambda tmp: pq.write_table(table, tmp))

    def read_table(self, shard: int, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        return pq.read_table(self.path(shard), columns=columns)

    def iter_tables(self, shards: list[int] | None = None, columns: list[str] | None = None) -> Iterator:
        """Committed shards in shard order (one in memory at a time)."""
        for k in self.done_shards() if shards is None else shards:
            yield self.read_table(k, columns)

    def concat(self, columns: list[str] | None = None):
        """All committed shards as one table (for the small columns a summary needs)."""
        import pyarrow as pa

        tables = list(self.iter_tables(columns=columns))
        # shards written before a column was added read as nulls there
        return pa.concat_tables(tables, promote_options="default") if tables else None
