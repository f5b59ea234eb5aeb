"""The catalog: a dataset streamed once into ``catalog.parquet`` (its usable rows, one parquet row group
per shard) and ``bad_rows.parquet`` (rows set aside while reading, with reasons). Every later stage of a
scan or an embedding run works shard by shard from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffmem.data import open_dataset
from diffmem.io import atomic_write
from diffmem.records import BadRow
from diffmem.scan.bad_rows import bad_table, read_bad

LABEL_COLUMNS = ("memorized", "is_memorized", "label")


def as_label(value) -> int | None:
    """A 0/1 memorized label from a bool, number or word (``None`` when it is not one)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "memorized"):
        return 1
    if s in ("0", "false", "no", ""):
        return 0
    try:
        return int(float(s) > 0)
    except ValueError:
        return None


def catalog_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("caption", pa.string()),
            ("image", pa.string()),
            ("label", pa.int64()),
            ("extra", pa.string()),
        ]
    )


def build_catalog(
    data: str,
    out: Path,
    *,
    shard_size: int,
    require_image: bool = True,
    check_files: bool | None = None,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    require_caption: bool = True,
) -> None:
    """Stream ``data`` once into ``out/catalog.parquet`` (usable rows, row group = shard of
    ``shard_size``) and ``out/bad_rows.parquet`` (``require_image``: a row must name an image;
    ``check_files``: a named image file must exist; default ``require_image``; ``require_caption=False``:
    a row without a caption is kept, with a null caption, for its image); the catalog is committed last
    (it marks the stage done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = open_dataset(
        data,
        id_column=id_column,
        caption_column=caption_column,
        image_column=image_column,
        require_image=require_image,
        check_files=require_image if check_files is None else check_files,
        require_caption=require_caption,
    )
    schema = catalog_schema()
    bad: list[dict] = []
    label_col = label_column

    def flush(writer, chunk: list[dict]) -> None:
        writer.write_table(pa.Table.from_pylist(chunk, schema=schema), row_group_size=shard_size)

    def write(tmp: str) -> None:
        nonlocal label_col
        chunk: list[dict] = []
        with pq.ParquetWriter(tmp, schema) as writer:
            for item in items:
                if isinstance(item, BadRow):
                    bad.append(read_bad(item))
                    continue
                if label_col is None:
                    label_col = next((c for c in LABEL_COLUMNS if c in item.extra), "")
                extra = {k: v for k, v in item.extra.items() if k != label_col}
                chunk.append(
                    {
                        "row": item.row,
                        "id": item.id,
                        "caption": item.caption,
                        "image": None if item.image is None else str(item.image),
                        "label": as_label(item.extra.get(label_col)) if label_col else None,
                        "extra": json.dumps(extra, default=str, ensure_ascii=False) if extra else None,
                    }
                )
                if len(chunk) == shard_size:
                    flush(writer, chunk)
                    chunk = []
            if chunk:
                flush(writer, chunk)

    tmp_catalog = out / ".catalog.parquet.building"
    write(str(tmp_catalog))
    atomic_write(out / "bad_rows.parquet", lambda tmp: pq.write_table(bad_table(bad), tmp))
    with open(tmp_catalog, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_catalog, out / "catalog.parquet")


class Catalog:
    """Read access to ``catalog.parquet``: shards (row groups) and whole small columns."""

    def __init__(self, out: Path):
        import pyarrow.parquet as pq

        self.path = out / "catalog.parquet"
        self.file = pq.ParquetFile(self.path)
        self.n_shards = self.file.num_row_groups
        self.n_rows = self.file.metadata.num_rows

    def shard(self, k: int, columns: list[str] | None = None) -> list[dict]:
        return self.file.read_row_group(k, columns=columns).to_pylist()

    def column(self, name: str) -> list:
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=[name]).column(name).to_pylist()
