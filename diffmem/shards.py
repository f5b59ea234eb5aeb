"""img2dataset outputs: list shards, stream their samples, and read one image's bytes from a member reference.

Layouts read (``diffmem.data.open_dataset`` dispatches here):

- **webdataset** (``output_format=webdataset``): a folder of tar shards ``00000.tar``, ``00001.tar``, ...
  (the ``00000.parquet`` / ``00000_stats.json`` files beside them are metadata only and ignored), or one
  ``.tar`` file. A sample is the run of consecutive members sharing a key (the member name up to the first
  dot after the last slash): ``{key}.jpg`` (or ``.jpeg`` / ``.png`` / ``.webp``), ``{key}.txt`` (the
  caption, UTF-8) and ``{key}.json`` (``key``, ``caption``, ``url``, ``status``, ``width``, ...).
- **parquet with image bytes** (``output_format=parquet``): a ``.parquet`` file, or a folder of ``*.parquet``
  shards, whose image is in a binary column (``jpg``, else ``jpeg`` / ``png`` / ``webp`` / ``image``) next
  to ``key`` and ``caption`` columns. A binary column is what tells it from a table of image paths.

Shards are read in name order and rows are numbered 0.. across them. Only the headers, captions and json
of a tar are read while streaming; an image is read later, alone, through its **member reference**, a
string that ``Record.image`` holds (as a ``Path``) and a scan catalog stores::

    /abs/path/00000.tar::4608+1234            # tar member: data offset + size, in bytes
    /abs/path/part.parquet::row=17,col=jpg    # parquet: 0-based row of the file, binary column

``read_member_bytes`` seeks to the offset (a tar is never rescanned); for parquet it reads the row's row
group, and keeps the last one read so sequential reads cost one row group read each. The column name is
percent-encoded, so a reference never holds a ``/`` after the container path and ``str(Path(ref)) == ref``.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
import threading
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from diffmem.records import (
    CAPTION_COLUMNS,
    ID_COLUMNS,
    BadImageError,
    BadRow,
    Record,
    caption_or_none,
    pick_column,
)

#: member extensions taken as the image of a webdataset sample, in order of preference
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: binary columns taken as the image of an img2dataset parquet file, in order of preference
IMAGE_BYTES_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")

_TAR_REF = re.compile(r"^(?P<path>.+\.tar)::(?P<offset>\d+)\+(?P<size>\d+)$", re.IGNORECASE)
_PARQUET_REF = re.compile(r"^(?P<path>.+\.parquet)::row=(?P<row>\d+),col=(?P<col>[^/:,]+)$", re.IGNORECASE)


# ------------------------------------------------------------------------------------- member references


@dataclass(frozen=True)
class MemberRef:
    """A parsed member reference: a tar member (``offset``, ``size``) or a parquet cell (``row``, ``column``)."""

    container: Path
    offset: int | None = None
    size: int | None = None
    row: int | None = None
    column: str | None = None


def member_ref(
    container: str | os.PathLike,
    *,
    offset: int | None = None,
    size: int | None = None,
    row: int | None = None,
    column: str | None = None,
) -> str:
    """The reference of a tar member (``offset``/``size`` of its data) or of a parquet cell (``row``/``column``)."""
    path = str(Path(container).absolute())
    suffix = Path(path).suffix.lower()
    if suffix == ".tar":
        if offset is None or size is None or offset < 0 or size < 0:
            raise ValueError(f"a tar member reference needs offset >= 0 and size >= 0, got {offset}, {size}")
        return f"{path}::{int(offset)}+{int(size)}"
    if suffix == ".parquet":
        if row is None or row < 0 or not column:
            raise ValueError(f"a parquet reference needs row >= 0 and a column, got {row}, {column!r}")
        return f"{path}::row={int(row)},col={quote(column, safe='')}"
    raise ValueError(f"{container}: a member reference names a .tar or .parquet file")


def parse_member_ref(ref: str | os.PathLike) -> MemberRef | None:
    """The parts of a member reference, or ``None`` when ``ref`` is not one (a plain file path)."""
    try:
        text = os.fspath(ref)
    except TypeError:
        return None
    if not isinstance(text, str) or "::" not in text:
        return None
    m = _TAR_REF.match(text)
    if m:
        return MemberRef(Path(m["path"]), offset=int(m["offset"]), size=int(m["size"]))
    m = _PARQUET_REF.match(text)
    if m:
        return MemberRef(Path(m["path"]), row=int(m["row"]), column=unquote(m["col"]))
    return None


def is_member_ref(ref: Any) -> bool:
    """Whether ``ref`` (a string or ``Path``) is a member reference rather than an image file path."""
    return parse_member_ref(ref) is not None


def read_member_bytes(ref: str | os.PathLike) -> bytes:
    """The bytes a member reference names; ``BadImageError`` (``missing_file`` ...) when they cannot be read."""
    parsed = parse_member_ref(ref)
    if parsed is None:
        raise ValueError(
            f"{ref} is not a member reference (container::offset+size or container::row=N,col=C)"
        )
    if parsed.offset is not None:
        return _read_tar_member(parsed, os.fspath(ref))
    return _read_parquet_cell(parsed, os.fspath(ref))


def _read_tar_member(parsed: MemberRef, ref: str) -> bytes:
    try:
        with open(parsed.container, "rb") as f:
            f.seek(parsed.offset)
            data = f.read(parsed.size)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        raise BadImageError("missing_file", f"{parsed.container} does not exist") from None
    except OSError as err:
        raise BadImageError("corrupt_image", f"{ref}: {err}") from None
    if len(data) < parsed.size:
        raise BadImageError(
            "truncated_image",
            f"{ref}: the tar ends {parsed.size - len(data)} bytes before the end of the member",
        )
    return data


class _RowGroupCache:
    """The last parquet row group read (one column), so reading the rows of a file in order is cheap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stamp: tuple | None = None
        self.file = None
        self.starts: list[int] = []
        self.rows = 0
        self.group: tuple[int, str] | None = None
        self.values = None

    def cell(self, parsed: MemberRef, ref: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, row, column = parsed.container, parsed.row, parsed.column
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise BadImageError("missing_file", f"{path} does not exist") from None
        stamp = (str(path), st.st_mtime_ns, st.st_size)
        with self.lock:
            try:
                if stamp != self.stamp:
                    self.stamp, self.group, self.values = None, None, None
                    self.file = pq.ParquetFile(path)
                    meta = self.file.metadata
                    self.starts = []
                    total = 0
                    for g in range(meta.num_row_groups):
                        self.starts.append(total)
                        total += meta.row_group(g).num_rows
                    self.rows = total
                    self.stamp = stamp
                if column not in self.file.schema_arrow.names:
                    raise BadImageError("missing_file", f"{ref}: {path} has no column {column!r}")
                if row >= self.rows:
                    raise BadImageError("missing_file", f"{ref}: {path} has {self.rows} rows")
                g = bisect_right(self.starts, row) - 1
                if self.group != (g, column):
                    self.group, self.values = None, None
                    self.values = self.file.read_row_group(g, columns=[column]).column(0)
                    self.group = (g, column)
                return self.values[row - self.starts[g]].as_py()
            except BadImageError:
                raise
            except (OSError, pa.ArrowException) as err:
                self.stamp = None
                raise BadImageError("corrupt_image", f"{ref}: cannot read the parquet file ({err})") from None


_ROW_GROUPS = _RowGroupCache()


def _read_parquet_cell(parsed: MemberRef, ref: str) -> bytes:
    value = _ROW_GROUPS.cell(parsed, ref)
    if value is None:
        raise BadImageError("missing_file", f"{ref}: the row has no image bytes")
    if not isinstance(value, bytes):
        raise BadImageError("corrupt_image", f"{ref}: the cell holds {type(value).__name__}, not bytes")
    return value


# -------------------------------------------------------------------------------------------- detection


def list_shards(path: str | os.PathLike, suffix: str) -> list[Path]:
    """``path`` itself if it is a file, else the folder's ``*{suffix}`` files sorted by name (absolute)."""
    path = Path(path).absolute()
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(
        (
            p
            for p in path.iterdir()
            if p.suffix.lower() == suffix and not p.name.startswith(".") and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _is_binary(arrow_type) -> bool:
    import pyarrow as pa

    checks = (pa.types.is_binary, pa.types.is_large_binary, getattr(pa.types, "is_binary_view", None))
    return any(check is not None and check(arrow_type) for check in checks)


def parquet_image_column(path: str | os.PathLike, image_column: str | None = None) -> str | None:
    """The binary image column of a parquet file (``image_column`` if it is binary), else ``None``."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    names = list(schema.names)
    candidates = (image_column,) if image_column is not None else IMAGE_BYTES_COLUMNS
    for name in candidates:
        if name in names and _is_binary(schema.field(name).type):
            return name
    return None


def detect(path: str | os.PathLike, image_column: str | None = None) -> str | None:
    """``"webdataset"``, ``"parquet"`` (image bytes) or ``None`` (not an img2dataset output)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix == ".tar":
            return "webdataset"
        if suffix == ".parquet":
            try:
                return "parquet" if parquet_image_column(path, image_column) else None
            except Exception:  # an unreadable file: the table reader reports it
                return None
        return None
    if not path.is_dir():
        return None
    if list_shards(path, ".tar"):
        return "webdataset"
    for shard in list_shards(path, ".parquet"):
        try:
            return "parquet" if parquet_image_column(shard, image_column) else None
        except Exception:  # a corrupt shard: judge the folder by the next one
            continue
    return None


# -------------------------------------------------------------------------------------------- webdataset


def _split_member_name(name: str) -> tuple[str | None, str]:
    """(key, extension) of a tar member name; key ``None`` for names that are no sample part."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None, ""
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _ShardDefect(Exception):
    """A tar shard that cannot be read to its end."""


def _tar_samples(shard: Path, text_exts: frozenset[str]) -> Iterator[tuple[str, dict]]:
    """(key, {extension: (data offset, size, bytes or None)}) for each sample of a tar shard, in order.

    Only members whose extension is in ``text_exts`` are read; images are located, not read. Raises
    ``_ShardDefect`` (after the samples read so far) for a shard that is truncated or corrupt; the sample
    being read then is dropped, its members being possibly incomplete.
    """
    key: str | None = None
    members: dict[str, tuple[int, int, bytes | None]] = {}
    complete = 0
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            while True:
                info = tf.next()
                if info is None:
                    break
                tf.members.clear()  # streaming: TarFile would otherwise keep every header it has read
                if not info.isreg():
                    continue
                k, ext = _split_member_name(info.name)
                if k is None:
                    continue
                if k != key:
                    if key is not None:
                        yield key, members
                        complete += 1
                    key, members = k, {}
                data = None
                if ext in text_exts:
                    f.seek(info.offset_data)
                    data = f.read(info.size)
                    if len(data) < info.size:
                        raise tarfile.ReadError(f"unexpected end of data in {info.name}")
                members.setdefault(ext, (info.offset_data, info.size, data))
            # tarfile stops silently at a cut or garbled header: a complete tar has its end-of-archive block
            f.seek(tf.offset)
            block = f.read(tarfile.BLOCKSIZE)
            if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError, UnicodeError) as err:
        pending = f"; sample {key!r} and the rest of the shard are skipped" if key is not None else ""
        raise _ShardDefect(
            f"{shard}: truncated or corrupt tar ({err}) after {complete} complete samples{pending}"
        ) from None
    if key is not None:
        yield key, members


def _decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} is not UTF-8 text (byte 0x{data[err.start]:02x})") from None


def iter_webdataset(
    path: str | os.PathLike,
    *,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    require_image: bool = True,
    require_caption: bool = True,
) -> Iterator[Record | BadRow]:
    """Stream the samples of a webdataset (one ``.tar`` or a folder of them) as ``Record`` / ``BadRow``.

    id: the json field ``id_column``, else the json's ``key``, else the member key. Caption: the member with
    extension ``caption_column`` or the json field of that name, else the ``.txt`` member, else the json's
    ``caption``. Image: the member with extension ``image_column``, else the first of ``IMAGE_EXTENSIONS``.
    The other json fields go to ``Record.extra``. A shard that is cut short gives one ``malformed_row``
    (naming the shard and how far it was read) and reading goes on with the next shard. Without
    ``require_caption`` a sample with no or an empty caption is a ``Record`` whose caption is ``None``.
    """
    shards = list_shards(path, ".tar")
    image_ext = image_column.lower().lstrip(".") if image_column else None
    text_exts = frozenset({"txt", "json"} | ({caption_column.lower()} if caption_column else set()))
    needs = (require_image, require_caption)
    return _webdataset_items(shards, id_column, caption_column, image_ext, text_exts, needs)


def _webdataset_items(shards, id_column, caption_column, image_ext, text_exts, needs):
    seen: set[str] = set()
    i = 0
    for shard in shards:
        source = str(shard)
        samples = _tar_samples(shard, text_exts)
        while True:
            try:
                key, members = next(samples)
            except StopIteration:
                break
            except _ShardDefect as err:
                yield BadRow(i, None, "malformed_row", str(err), source)
                i += 1
                break
            yield _sample_item(i, key, members, shard, seen, id_column, caption_column, image_ext, needs)
            i += 1


def _sample_item(i, key, members, shard, seen, id_column, caption_column, image_ext, needs):
    require_image, require_caption = needs
    source = str(shard)
    meta: dict[str, Any] = {}
    caption: Any = None
    try:
        if "json" in members:
            obj = json.loads(_decode_text(members["json"][2], f"{key}.json"))
            if not isinstance(obj, dict):
                raise ValueError(f"{key}.json is not a JSON object")
            meta = obj
        cap_ext = caption_column.lower() if caption_column and caption_column.lower() in members else None
        if cap_ext is None and caption_column is None and "txt" in members:
            cap_ext = "txt"
        if cap_ext is not None:
            caption = _decode_text(members[cap_ext][2], f"{key}.{cap_ext}")
    except json.JSONDecodeError as err:
        return BadRow(i, key, "malformed_row", f"{key}.json is not valid JSON ({err.msg})", source)
    except ValueError as err:
        return BadRow(i, key, "malformed_row", str(err), source)

    if id_column is not None:
        raw_id = meta.get(id_column)
        if raw_id is None or str(raw_id).strip() == "":
            return BadRow(i, None, "missing_id", f"sample {key!r}: no json field {id_column!r}", source)
    else:
        raw_id = meta.get("key")
        raw_id = key if raw_id is None or str(raw_id).strip() == "" else raw_id
    rid = str(raw_id).strip()
    if rid in seen:
        return BadRow(i, rid, "duplicate_id", f"id {rid!r} already used by an earlier sample", source)
    seen.add(rid)

    if caption is None:
        if caption_column is not None:
            caption = meta.get(caption_column)
        else:
            caption = next((meta[c] for c in CAPTION_COLUMNS if meta.get(c) is not None), None)
    caption = caption_or_none(caption)
    if caption is None and require_caption:
        return BadRow(i, rid, "empty_caption", f"sample {key!r} has an empty caption", source)

    ext = image_ext if image_ext is not None else next((e for e in IMAGE_EXTENSIONS if e in members), None)
    image: Path | None = None
    if ext is None or ext not in members:
        if require_image:
            wanted = f".{ext}" if ext else "/".join(f".{e}" for e in IMAGE_EXTENSIONS)
            return BadRow(i, rid, "missing_image_path", f"sample {key!r} has no {wanted} member", source)
    else:
        offset, size, _ = members[ext]
        image = Path(member_ref(shard, offset=offset, size=size))
    skip = {"key", "caption", id_column, caption_column}
    extra = {k: v for k, v in meta.items() if k not in skip}
    return Record(rid, caption, image, i, extra)


# ------------------------------------------------------------------------------------ parquet with bytes


def iter_parquet_bytes(
    path: str | os.PathLike,
    *,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    require_image: bool = True,
    require_caption: bool = True,
    batch_size: int = 64,
) -> Iterator[Record | BadRow]:
    """Stream an img2dataset parquet output (one file or a folder of shards) as ``Record`` / ``BadRow``.

    Columns are chosen on the first readable shard: image from ``image_column`` or ``IMAGE_BYTES_COLUMNS``
    (binary), caption from ``CAPTION_COLUMNS``, id from ``ID_COLUMNS`` (else the row number). Other
    non-binary columns go to ``Record.extra``. Raises ``ValueError`` when no shard has those columns.
    """
    import pyarrow.parquet as pq

    shards = list_shards(path, ".parquet")
    img_col = None
    for shard in shards:
        try:
            img_col = parquet_image_column(shard, image_column)
            columns = list(pq.read_schema(shard).names)
        except Exception:
            continue
        if img_col is not None:
            break
    if img_col is None:
        raise ValueError(f"{path}: no binary image column (looked for {', '.join(IMAGE_BYTES_COLUMNS)})")
    cap_col = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", str(shard))
    if cap_col is None and require_caption:
        raise ValueError(
            f"{shard}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}; pass caption_column)"
        )
    id_col = pick_column(columns, id_column, ID_COLUMNS, "id", str(shard))
    needs = (require_image, require_caption)
    return _parquet_items(shards, id_col, cap_col, img_col, needs, batch_size)


def _parquet_items(shards, id_col, cap_col, img_col, needs, batch_size):
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    seen: set[str] = set()
    i = 0
    for shard in shards:
        source = str(shard)
        pos = 0  # row of the current file
        try:
            pf = pq.ParquetFile(shard)
            schema = pf.schema_arrow
            missing = [c for c in (img_col, cap_col, id_col) if c is not None and c not in schema.names]
            if missing:
                raise ValueError(f"no column {', '.join(map(repr, missing))}")
            if not _is_binary(schema.field(img_col).type):
                raise ValueError(f"column {img_col!r} holds {schema.field(img_col).type}, not image bytes")
            others = [f.name for f in schema if f.name != img_col and not _is_binary(f.type)]
            for batch in pf.iter_batches(batch_size=batch_size, columns=[img_col, *others]):
                lengths = pc.binary_length(batch.column(0)).to_pylist()
                for length, row in zip(lengths, batch.select(others).to_pylist()):
                    yield _parquet_item(i, pos, row, length, shard, seen, id_col, cap_col, img_col, needs)
                    i += 1
                    pos += 1
        except (OSError, ValueError, pa.ArrowException) as err:
            yield BadRow(i, None, "malformed_row", f"{shard}: unreadable after {pos} rows ({err})", source)
            i += 1


def _parquet_item(i, pos, row, length, shard, seen, id_col, cap_col, img_col, needs):
    require_image, require_caption = needs
    source = str(shard)
    if id_col is not None:
        raw_id = row.get(id_col)
        if raw_id is None or str(raw_id).strip() == "":
            return BadRow(i, None, "missing_id", f"column {id_col!r} is empty", source)
    else:
        raw_id = i
    rid = str(raw_id).strip()
    if rid in seen:
        return BadRow(i, rid, "duplicate_id", f"id {rid!r} already used by an earlier row", source)
    seen.add(rid)
    caption = caption_or_none(row.get(cap_col) if cap_col else None)
    if caption is None and require_caption:
        return BadRow(i, rid, "empty_caption", "the caption is empty", source)
    image: Path | None = None
    if not length:
        if require_image:
            return BadRow(i, rid, "missing_image_path", f"column {img_col!r} is empty", source)
    else:
        image = Path(member_ref(shard, row=pos, column=img_col))
    extra = {k: v for k, v in row.items() if k not in (id_col, cap_col)}
    return Record(rid, caption, image, i, extra)
