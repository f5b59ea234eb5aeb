"""The one record of rows set aside (``bad_rows.parquet`` and the per-shard image checks): row, id,
reason (a key of ``diffmem.data.REASONS``), detail, and the stage that set it aside."""

from __future__ import annotations

BAD_SCHEMA_FIELDS = (
    ("row", "int64"),
    ("id", "string"),
    ("reason", "string"),
    ("detail", "string"),
    ("stage", "string"),
)


def bad_schema():
    import pyarrow as pa

    return pa.schema([(n, getattr(pa, t)()) for n, t in BAD_SCHEMA_FIELDS])


def bad_table(rows: list[dict]):
    """A pyarrow table of bad-row dicts (the ``BAD_SCHEMA_FIELDS`` columns)."""
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=bad_schema())


def read_bad(badrow, stage: str = "read") -> dict:
    """A ``diffmem.data.BadRow`` as a record of ``stage``."""
    d = badrow.as_dict()
    d.pop("source", None)
    return {**d, "stage": stage}
