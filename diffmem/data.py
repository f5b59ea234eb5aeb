"""Read captioned image datasets as a stream of records; bad rows are data, not exceptions.

Sources (``open_dataset``):

- an image folder with ``metadata.jsonl`` (or ``metadata.csv`` / ``metadata.parquet``) at its root, the
  Hugging Face ``imagefolder`` convention: a ``file_name`` column (path relative to the folder), a caption
  column and any extra columns;
- a ``.csv`` / ``.jsonl`` / ``.parquet`` table of (id, caption, image path); relative image paths are
  relative to the table's folder;
- img2dataset outputs (``diffmem.shards``): webdataset tar shards, one ``.tar`` or a folder of them
  (``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample), or a parquet file / folder of shards whose
  image bytes are in a binary column (``jpg``, ...) beside ``key`` and ``caption``. ``Record.image`` is
  then a member reference (``/abs/00000.tar::4608+1234``, ``/abs/part.parquet::row=17,col=jpg``) that
  ``load_rgb`` reads without rescanning the shard.

Every row becomes a ``Record`` or a ``BadRow`` (with a reason from ``REASONS``), in source order. Cheap
checks (empty caption, duplicate or missing id, missing image file) happen while reading; image checks
(corrupt, truncated, CMYK, 16-bit) happen when the image is loaded (``load_rgb`` / ``check_record``),
since opening every image up front would read the whole dataset twice.

``ImageFolderWriter`` writes the same layout (PNG files + ``metadata.jsonl``), the file committed atomically.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from diffmem import shards
from diffmem.io import atomic_write
from diffmem.records import (
    CAPTION_COLUMNS,
    ID_COLUMNS,
    BadImageError,
    BadRow,
    Record,
    caption_or_none,
    pick_column,
)

IMAGE_COLUMNS = ("file_name", "image", "image_path", "path", "file", "filepath")
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


# ----------------------------------------------------------------------------------------------- reading


def _not_utf8(text: str) -> bool:
    """Whether ``text`` (read with ``errors="surrogateescape"``) held bytes that are not UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _bad_byte(text: str) -> str:
    ch = next(ch for ch in text if "\udc80" <= ch <= "\udcff")
    return f"byte 0x{ord(ch) - 0xDC00:02x}"


def _iter_table_rows(path: Path) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """Column names and a row iterator for a csv / jsonl / parquet file, streamed."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        # undecodable bytes survive as surrogates, so one bad row is reported and the others are read
        f = open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")  # noqa: SIM115
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])

        def rows_csv() -> Iterator[dict[str, Any]]:
            with f:
                for row in reader:
                    bad = next((v for v in row.values() if isinstance(v, str) and _not_utf8(v)), None)
                    if bad is not None:
                        yield {"__error__": f"line {reader.line_num}: not UTF-8 text ({_bad_byte(bad)})"}
                        continue
                    yield row

        return columns, rows_csv()
    if suffix in (".jsonl", ".json"):

        def rows_jsonl() -> Iterator[dict[str, Any]]:
            with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    if _not_utf8(line):
                        yield {"__error__": f"line {lineno} is not UTF-8 text ({_bad_byte(line)})"}
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        yield {"__error__": f"line {lineno} is not valid JSON ({err.msg})"}
                        continue
                    yield (
                        obj if isinstance(obj, dict) else {"__error__": f"line {lineno} is not a JSON object"}
                    )

        columns: list[str] = []
        with open(path, encoding="utf-8-sig", errors="replace") as f:  # columns from the first object
            for line in f:
                if line.strip():
                    try:
                        first = json.loads(line)
                        columns = list(first) if isinstance(first, dict) else []
                    except json.JSONDecodeError:
                        pass
                    break
        return columns, rows_jsonl()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        columns = list(pf.schema_arrow.names)

        def rows_parquet() -> Iterator[dict[str, Any]]:
            for batch in pf.iter_batches(batch_size=4096):
                yield from batch.to_pylist()

        return columns, rows_parquet()
    raise ValueError(f"{path}: unsupported table format {suffix!r} (expected .csv, .jsonl or .parquet)")


def find_metadata(folder: str | os.PathLike) -> Path:
    """The metadata file of an image folder (``metadata.jsonl``, ``.csv`` or ``.parquet``)."""
    folder = Path(folder)
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"{folder}: no {', '.join(METADATA_FILES)} in this image folder "
        "(expected the Hugging Face imagefolder layout: images plus a metadata file with a file_name column; "
        "or img2dataset shards: *.tar, or *.parquet with an image-bytes column)"
    )


def open_dataset(
    path: str | os.PathLike,
    *,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    require_image: bool = True,
    check_files: bool = True,
    argument: str = "--data",
    require_caption: bool = True,
) -> Iterator[Record | BadRow]:
    """Stream the rows of a dataset (image folder, table or img2dataset output) as ``Record`` / ``BadRow``,
    in source order.

    Columns are found by name unless given: id from ``ID_COLUMNS`` (else the image path, else the row
    number), caption from ``CAPTION_COLUMNS``, image from ``IMAGE_COLUMNS``. The first row with an id
    wins; later rows with the same id are ``duplicate_id``. Memory: one set of seen ids.
    Raises ``FileNotFoundError`` / ``ValueError`` (naming ``argument``) only for a dataset that cannot be
    read at all.

    img2dataset outputs (a ``.tar``, a folder of ``*.tar``, or parquet with a binary image column; a folder
    with a metadata file stays an image folder) are read by ``diffmem.shards``: for tar shards
    ``caption_column`` / ``id_column`` name json fields (or, for the caption, a text member extension) and
    ``image_column`` the image member's extension; for parquet they name columns. ``check_files`` does not
    apply there (the images are inside the shards, read by ``load_rgb``).

    ``require_caption=False`` (a training side, where the image matters and its caption may be absent, as
    in LAION): a row with no or an empty caption is a ``Record`` with ``caption=None`` instead of an
    ``empty_caption`` bad row, and a source without any caption column is read.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{argument}: {path} does not exist")
    has_metadata = path.is_dir() and any((path / name).is_file() for name in METADATA_FILES)
    kind = None if has_metadata else shards.detect(path, image_column)
    options = dict(
        id_column=id_column,
        caption_column=caption_column,
        image_column=image_column,
        require_image=require_image,
        require_caption=require_caption,
    )
    if kind == "webdataset":
        return shards.iter_webdataset(path, **options)
    if kind == "parquet":
        return shards.iter_parquet_bytes(path, **options)
    table = find_metadata(path) if path.is_dir() else path
    base = table.parent
    columns, rows = _iter_table_rows(table)
    source = str(table)
    cap_col = pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", source)
    if cap_col is None and columns and require_caption:
        raise ValueError(
            f"{source}: no caption column (looked for {', '.join(CAPTION_COLUMNS)}; pass caption_column)"
        )
    img_col = pick_column(columns, image_column, IMAGE_COLUMNS, "image path", source)
    if img_col is None and require_image and columns:
        raise ValueError(
            f"{source}: no image column (looked for {', '.join(IMAGE_COLUMNS)}; pass image_column)"
        )
    id_col = pick_column(columns, id_column, ID_COLUMNS, "id", source)
    needs = (require_image, check_files, require_caption)
    return _records(rows, base, source, id_col, cap_col, img_col, needs)


def _records(rows, base, source, id_col, cap_col, img_col, needs):
    require_image, check_files, require_caption = needs
    seen: set[str] = set()
    used = {id_col, cap_col, img_col}
    for i, row in enumerate(rows):
        if "__error__" in row:
            yield BadRow(i, None, "malformed_row", row["__error__"], source)
            continue
        raw_id = row.get(id_col) if id_col else None
        image_value = row.get(img_col) if img_col else None
        if raw_id is None or str(raw_id).strip() == "":
            if id_col is not None:
                yield BadRow(i, None, "missing_id", f"column {id_col!r} is empty", source)
                continue
            raw_id = image_value if image_value not in (None, "") else i
        rid = str(raw_id).strip()
        if rid in seen:
            yield BadRow(i, rid, "duplicate_id", f"id {rid!r} already used by an earlier row", source)
            continue
        seen.add(rid)
        caption = caption_or_none(row.get(cap_col) if cap_col else None)
        if caption is None and require_caption:
            yield BadRow(i, rid, "empty_caption", "the caption is empty", source)
            continue
        image: Path | None = None
        if image_value is None or str(image_value).strip() == "":
            if require_image:
                yield BadRow(i, rid, "missing_image_path", f"column {img_col!r} is empty", source)
                continue
        else:
            image = Path(str(image_value))
            image = image if image.is_absolute() else (base / image)
            if check_files and not image.is_file():
                yield BadRow(i, rid, "missing_file", f"{image} does not exist", source)
                continue
        extra = {k: v for k, v in row.items() if k not in used}
        yield Record(rid, caption, image, i, extra)


# ----------------------------------------------------------------------------------------------- images


def _is_high_bit_depth(im) -> bool:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return True
    for tile in getattr(im, "tile", None) or []:
        args = tile[3] if isinstance(tile, tuple) else getattr(tile, "args", None)
        raw = args[0] if isinstance(args, tuple) and args else args
        if isinstance(raw, str) and ("16" in raw.split(";")[-1] or raw.endswith(";16B")):
            return True
    return False


def _to_rgb_8bit(im):
    """Scale a 16-bit / int32 / float image to 8-bit RGB (full range of its type, not clipping)."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":  # 16-bit RGB that PIL already reduced to 8 bits by dropping the low byte
        return im
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0) <= 1.0 else np.clip(arr, 0, 255)
    elif im.mode.startswith("I;16") or arr.max(initial=0) <= 65535:
        arr = arr.astype(np.float64) / 257.0
    else:
        arr = arr.astype(np.float64) / (2**32 - 1) * 255.0
    return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")


def load_rgb(path: str | os.PathLike, *, convert_modes: bool = False):
    """Open an image as 8-bit RGB, or raise ``BadImageError`` with a ``REASONS`` key.

    ``path`` is an image file or a member reference into an img2dataset shard (``diffmem.shards``), whose
    bytes are decoded the same way. Palette, grey, and alpha images are converted (alpha composited on
    white). CMYK and 16-bit images are refused unless ``convert_modes`` (CMYK then goes through PIL's
    conversion, using an embedded ICC profile when there is one; 16-bit is divided by 257, not clipped).
    """
    import io

    if shards.is_member_ref(path):
        name = os.fspath(path)
        return _decode_rgb(io.BytesIO(shards.read_member_bytes(name)), name, convert_modes)
    path = Path(path)
    if not path.is_file():
        raise BadImageError("missing_file", f"{path} does not exist")
    return _decode_rgb(path, str(path), convert_modes)


def _decode_rgb(source, name: str, convert_modes: bool):
    """``load_rgb``'s decoding, for a file path or a file-like object of image bytes (``name`` for messages)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as im:
            high = _is_high_bit_depth(im)
            im.load()
            mode = im.mode
            if mode == "CMYK":
                if not convert_modes:
                    raise BadImageError("cmyk_image", f"{name} is CMYK")
                return _cmyk_to_rgb(im)
            if high:
                if not convert_modes:
                    raise BadImageError("high_bit_depth", f"{name} has mode {mode} with more than 8 bits")
                return _to_rgb_8bit(im)
            if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            if mode in ("RGB", "L", "P", "1", "YCbCr", "LAB", "HSV"):
                return im.convert("RGB")
            raise BadImageError("unsupported_mode", f"{name} has mode {mode}")
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError("too_large", f"{name}: {err}") from None
    except UnidentifiedImageError:
        raise BadImageError("corrupt_image", f"{name} is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        reason = "truncated_image" if "truncated" in str(err).lower() else "corrupt_image"
        raise BadImageError(reason, f"{name}: {err}") from None


def _cmyk_to_rgb(im):
    icc = im.info.get("icc_profile")
    if icc:
        try:
            import io

            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except Exception:  # a broken profile: fall back to the plain formula
            pass
    return im.convert("RGB")


def check_record(record: Record, *, convert_modes: bool = False):
    """``(image, None)`` for a loadable record, ``(None, BadRow)`` otherwise."""
    if record.image is None:
        return None, BadRow(record.row, record.id, "missing_image_path", "the row names no image file")
    try:
        return load_rgb(record.image, convert_modes=convert_modes), None
    except BadImageError as err:
        return None, BadRow(record.row, record.id, err.reason, err.detail)


def split_rows(items: Iterable[Record | BadRow]) -> tuple[list[Record], list[BadRow]]:
    """Materialize a (small) stream into records and bad rows."""
    good, bad = [], []
    for item in items:
        (bad if isinstance(item, BadRow) else good).append(item)
    return good, bad


# ----------------------------------------------------------------------------------------------- writing


def _safe_name(item_id: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in item_id)
    return keep.strip(".")[:100] or "item"


class ImageFolderWriter:
    """Write an image folder with ``metadata.jsonl`` (Hugging Face imagefolder layout), streaming.

    Images are written as PNG (each atomically); metadata lines go to a temporary file that is renamed
    to ``metadata.jsonl`` on ``close()``, so a half-written folder never looks complete.
    Columns: ``file_name``, ``id``, ``text`` (the caption), then any extra columns.
    """

    def __init__(self, folder: str | os.PathLike, caption_column: str = "text"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.caption_column = caption_column
        self._tmp = self.folder / ".metadata.jsonl.tmp"
        self._f = open(self._tmp, "w", encoding="utf-8")  # noqa: SIM115
        self._names: set[str] = set()
        self.count = 0

    def add(self, item_id: str, caption: str, image, **extra: Any) -> Path:
        """Add one image (PIL image or HxWxC uint8 array); returns its path."""
        from PIL import Image

        name = _safe_name(str(item_id))
        stem, n = name, 1
        while name + ".png" in self._names:
            n += 1
            name = f"{stem}-{n}"
        file_name = name + ".png"
        self._names.add(file_name)
        if not isinstance(image, Image.Image):
            image = Image.fromarray(image)
        path = self.folder / file_name
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        row = {"file_name": file_name, "id": str(item_id), self.caption_column: caption, **extra}
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.count += 1
        return path

    def close(self) -> Path:
        """Commit ``metadata.jsonl`` (fsync + rename)."""
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.folder / "metadata.jsonl")
        return self.folder / "metadata.jsonl"

    def __enter__(self) -> ImageFolderWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


def write_image_folder(
    folder: str | os.PathLike, items: Iterable[tuple[str, str, Any]], **extra_columns
) -> Path:
    """Write ``(id, caption, image)`` items as an image folder; returns the ``metadata.jsonl`` path."""
    with ImageFolderWriter(folder) as writer:
        for item_id, caption, image in items:
            writer.add(item_id, caption, image, **extra_columns)
    return Path(folder) / "metadata.jsonl"
