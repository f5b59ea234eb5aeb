"""clip-retrieval's embedding layout (the layout of LAION's released embeddings), written and read shard by shard.

::

    DIR/embeddings.json                  what made it: embedder description, dtype, data, shard size
    DIR/catalog.parquet, bad_rows.parquet the rows embedded (``diffmem.scan.catalog``), one row group a shard
    DIR/img_emb/img_emb_0000.npy         (n_k, d) unit descriptors of shard 0 (float16 by default)
    DIR/metadata/metadata_0000.parquet   their rows: image_path, caption, id, row (the source row)
    DIR/bad_images/bad_images_0000.parquet  rows of shard 0 whose image did not load, with reasons

A shard is done when its ``.npy`` file exists: it is committed last, after its metadata and bad images,
each written atomically. Positions (``0 .. n-1``, the ids of a faiss index built over the layout) run
through the shards in shard order. ``vectors_at`` maps a shard only while it copies a chunk of rows out, so an
exact re-rank of a few candidates does not pull whole shards into the resident set.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.io import atomic_write, atomic_write_bytes, atomic_write_json, first_difference
from diffmem.scan.bad_rows import bad_table

FORMAT = "clip-retrieval"
RECORD = "embeddings.json"
#: the layout's shard folders
LAYOUT_FOLDERS = ("img_emb", "metadata", "bad_images")
#: the columns every ``metadata_NNNN.parquet`` of a layout with its ``embeddings.json`` must have
#: (``diffmem embed`` writes them; a clip-retrieval folder read with a declared embedder has its own)
METADATA_COLUMNS = ("image_path", "caption", "id", "row")
_REDO = "delete the shard's files and rerun `diffmem embed` to redo it"


def shard_name(kind: str, k: int) -> str:
    return f"{kind}_{k:04d}"


def metadata_schema():
    """The columns of ``metadata_NNNN.parquet`` (clip-retrieval's ``image_path`` and ``caption``, then
    diffmem's ``id`` and the source ``row``)."""
    import pyarrow as pa

    return pa.schema(
        [("image_path", pa.string()), ("caption", pa.string()), ("id", pa.string()), ("row", pa.int64())]
    )


class LayoutWriter:
    """Commit shards of a layout folder (one process writes each shard; any number of writers)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def npy_path(self, k: int) -> Path:
        return self.root / "img_emb" / f"{shard_name('img_emb', k)}.npy"

    def done(self, k: int) -> bool:
        return self.npy_path(k).is_file()

    def write_shard(self, k: int, vectors: np.ndarray, metadata, bad_images) -> None:
        """Commit shard ``k``: ``metadata`` / ``bad_images`` are pyarrow tables; the ``.npy`` goes last."""
        import io

        import pyarrow.parquet as pq

        meta = self.root / "metadata" / f"{shard_name('metadata', k)}.parquet"
        bad = self.root / "bad_images" / f"{shard_name('bad_images', k)}.parquet"
        atomic_write(meta, lambda tmp: pq.write_table(metadata, tmp))
        atomic_write(bad, lambda tmp: pq.write_table(bad_images, tmp))
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(vectors))
        atomic_write_bytes(self.npy_path(k), buf.getvalue())


def write_vectors(
    root: str | os.PathLike, blocks, embedder: dict[str, Any], dtype: str = "float16"
) -> EmbeddingLayout:
    """A layout of descriptors made elsewhere (one shard per block of ``blocks``; ids ``v{position}``,
    no images): for vectors that did not come from ``diffmem embed``, e.g. a benchmark's or a test's."""
    import pyarrow as pa

    root = Path(root)
    write_record(root, {"format": FORMAT, "embedder": embedder, "dtype": dtype})
    writer = LayoutWriter(root)
    start = 0
    for k, block in enumerate(blocks):
        ids = range(start, start + len(block))
        meta = pa.table(
            {"image_path": [None] * len(block), "caption": [""] * len(block), "id": [f"v{i}" for i in ids],
             "row": list(ids)},
            schema=metadata_schema(),
        )  # fmt: skip
        writer.write_shard(k, np.asarray(block).astype(dtype), meta, bad_table([]))
        start += len(block)
    return EmbeddingLayout(root)


def write_record(root: Path, record: dict[str, Any], argument: str = "--out") -> None:
    """Write ``embeddings.json``, or refuse (naming the first differing field) a resume with other settings."""
    path = root / RECORD
    if path.is_file():
        old = json.loads(path.read_text())
        k = first_difference(old, record)
        if k is not None:
            raise ValueError(
                f"{argument}: {root} holds embeddings made with other settings ({k}: {old.get(k)!r} there, "
                f"{record.get(k)!r} now); rerun with the same settings to resume, or use another folder"
            )
    else:
        atomic_write_json(path, record)


def _npy_header(path: Path, argument: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a ``.npy`` file (header only); a file that is not one, or whose
    data is shorter than its header says, is a ``ValueError`` naming ``argument``, the file and the sizes."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, EOFError, OSError) as err:
        why = "empty" if path.stat().st_size == 0 else f"no NumPy .npy header: {str(err).splitlines()[0]}"
        raise ValueError(f"{argument}: {path} is not a NumPy .npy array ({why}); {_REDO}") from None
    if fortran:
        raise ValueError(f"{argument}: {path} is a Fortran-ordered array; expected C order; {_REDO}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ValueError(
            f"{argument}: {path} is truncated: its header says {shape} {dtype} ({expected} bytes), "
            f"the file holds {size} bytes; {_REDO}"
        )
    return shape, dtype, offset


def _metadata_rows(path: Path, npy: Path, argument: str, columns: tuple[str, ...]) -> int:
    """The row count of a shard's metadata file, checked to exist, be parquet and hold ``columns``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} is missing (the rows of {npy.name}'s vectors); {_REDO}")
    try:
        meta = pq.read_schema(path), pq.read_metadata(path).num_rows
    except (pa.ArrowException, OSError):
        raise ValueError(f"{argument}: {path} is not a parquet file (or is damaged); {_REDO}") from None
    missing = [c for c in columns if c not in meta[0].names]
    if missing:
        raise ValueError(
            f"{argument}: {path} lacks the column(s) {', '.join(missing)} "
            f"(expected {', '.join(columns)}; it has {', '.join(meta[0].names) or 'none'})"
        )
    return meta[1]


def find_shard_files(folder: Path, kind: str, suffix: str, argument: str) -> dict[int, Path]:
    """Shard number -> file, for the ``{kind}_{number}{suffix}`` files of ``folder`` with any zero padding
    (clip-retrieval pads the number to its partition count, ``img_emb_0.npy`` or ``img_emb_00.npy``;
    ``diffmem embed`` to 4 digits). Two files of one number are refused."""
    pattern = re.compile(rf"{re.escape(kind)}_(\d+){re.escape(suffix)}$")
    found: dict[int, Path] = {}
    if not folder.is_dir():
        return found
    for p in sorted(folder.iterdir()):
        m = pattern.match(p.name)
        if m is None:
            continue
        k = int(m.group(1))
        if k in found:
            raise ValueError(f"{argument}: {folder} holds two files of shard {k} ({found[k].name}, {p.name})")
        found[k] = p
    return found


def declared_embedder(name: str, dim: int) -> dict[str, Any]:
    """The description of an embedder declared by name (``--train-embedder``) for vectors that came
    without an ``embeddings.json``: only its name and the vectors' dimension are known."""
    return {"embedder": name, "dim": dim, "declared": True}


def names_embedder(declared: str, name: str) -> bool:
    """Whether a declared name names the embedder ``name``: equal, or a ``:``-prefix of it
    (``open_clip:ViT-B-32`` names ``open_clip:ViT-B-32:weights.pt``)."""
    return name == declared or name.startswith(f"{declared}:")


class EmbeddingLayout:
    """Read a layout folder: vectors by shard or by position, metadata columns, bad images, the record.

    Besides ``diffmem embed``'s own folders it reads a folder as clip-retrieval writes it: shard numbers
    with any padding, metadata with ``image_path`` / ``caption`` (and ``url``, ``key``, ...) but no ``id`` or
    ``row`` (``ids`` / ``rows`` then come from ``key`` or the position), and no ``embeddings.json`` when the
    embedder is declared (``declared``: its name, ``--train-embedder``)."""

    def __init__(
        self, root: str | os.PathLike, argument: str = "--train-embeddings", declared: str | None = None
    ):
        self.root = Path(root)
        if not (self.root / "img_emb").is_dir():
            raise FileNotFoundError(
                f"{argument}: {self.root} is not an embedding folder (no img_emb/; make one with `diffmem embed`)"
            )
        record = self.root / RECORD
        if not record.is_file() and declared is None:
            raise FileNotFoundError(
                f"{argument}: {self.root} has no {RECORD}, so which embedder made it is unknown "
                "(`diffmem embed` writes it; for embeddings made elsewhere, e.g. by clip-retrieval, declare their "
                "embedder with --train-embedder NAME)"
            )
        self.record: dict[str, Any] = {}
        if record.is_file():
            try:
                self.record = json.loads(record.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{argument}: {record} is not JSON (`diffmem embed` writes it)") from None
            if not isinstance(self.record, dict) or not isinstance(self.record.get("embedder", {}), dict):
                raise ValueError(f'{argument}: {record} must hold a JSON object with an "embedder" object')
        if declared is not None and self.record:
            if not names_embedder(declared, str(self.embedder.get("embedder"))):
                raise ValueError(
                    f"--train-embedder: {self.root}'s {RECORD} names the embedder "
                    f"{self.embedder.get('embedder')!r}, not {declared!r}"
                )
        found = find_shard_files(self.root / "img_emb", "img_emb", ".npy", argument)
        shards = sorted(found)
        self.shards = shards
        self.files = [found[k] for k in shards]
        self._metadata = find_shard_files(self.root / "metadata", "metadata", ".parquet", argument)
        headers = [_npy_header(p, argument) for p in self.files]
        self._check(headers, argument, METADATA_COLUMNS if self.record else ())
        self.dim = headers[0][0][1] if headers else int(self.embedder.get("dim", 0))
        if declared is not None and not self.record:
            self.record = {"format": FORMAT, "embedder": declared_embedder(declared, self.dim)}
        self.counts = np.asarray([h[0][0] for h in headers], dtype=np.int64)
        self._dtypes = [h[1] for h in headers]
        self._offsets = [h[2] for h in headers]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.ntotal = int(self.starts[-1])

    @property
    def embedder(self) -> dict[str, Any]:
        return self.record.get("embedder", {})

    def _check(self, headers, argument: str, columns: tuple[str, ...]) -> None:
        """Every shard against the record and its metadata: (n, d) arrays of the record's dtype and the
        embedder's dimension (else the first shard's), as many metadata rows as vectors, holding
        ``columns``, every catalog shard present."""
        dtype = self.record.get("dtype")
        dim = self.embedder.get("dim")
        first = None
        for k, path, (shape, dt, _) in zip(self.shards, self.files, headers, strict=True):
            if len(shape) != 2:
                raise ValueError(f"{argument}: {path} holds a {shape} array; expected (n, d) vectors")
            if dtype is not None and dt != np.dtype(dtype):
                raise ValueError(f"{argument}: {path} holds {dt} vectors; {RECORD} says {dtype}")
            want = dim if isinstance(dim, int) else first
            if want is not None and shape[1] != want:
                where = f"the embedder in {RECORD}" if isinstance(dim, int) else f"{self.files[0].name}"
                raise ValueError(
                    f"{argument}: {path} holds {shape[1]}-d vectors; expected {want}-d (as {where})"
                )
            first = shape[1]
            meta = self.metadata_file(k)
            rows = _metadata_rows(meta, path, argument, columns)
            if rows != shape[0]:
                raise ValueError(
                    f"{argument}: {path} holds {shape[0]} vectors but {meta} has {rows} rows; "
                    f"a shard's vectors and rows must match one to one: {_REDO}"
                )
        self._check_complete(argument)

    def _check_complete(self, argument: str) -> None:
        """A layout with its catalog (``diffmem embed``'s) must have a shard for every catalog shard."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        catalog = self.root / "catalog.parquet"
        if not catalog.is_file():
            return
        try:
            n = pq.ParquetFile(catalog).metadata.num_row_groups
        except (pa.ArrowException, OSError):
            raise ValueError(f"{argument}: {catalog} is not a parquet file (or is damaged)") from None
        absent = sorted(set(range(n)) - set(self.shards))
        if absent:
            shown = ", ".join(str(k) for k in absent[:5]) + (", ..." if len(absent) > 5 else "")
            raise ValueError(
                f"{argument}: {self.root} is incomplete: {len(absent)} of its {n} shards are not embedded "
                f"(img_emb_NNNN.npy for shard {shown}); rerun `diffmem embed` with the same settings to finish it"
            )

    def fingerprint(self) -> dict[str, Any]:
        """What an index over this layout depends on: the embedder, the shards and their sizes."""
        return {"embedder": self.embedder, "shards": self.shards, "counts": self.counts.tolist()}

    def shard_vectors(self, i: int) -> np.ndarray:
        """The vectors of the ``i``-th shard present, as float32."""
        return np.load(self.files[i]).astype(np.float32, copy=False)

    def iter_vectors(self, batch: int = 1 << 20):
        """``(start_position, float32 block)`` through all vectors, one shard (or ``batch`` rows) at a time."""
        for i in range(len(self.files)):
            if self.counts[i] == 0:
                continue
            arr = np.load(self.files[i], mmap_mode="r")
            for s in range(0, len(arr), batch):
                yield int(self.starts[i] + s), np.asarray(arr[s : s + batch], dtype=np.float32)

    def all_vectors(self) -> np.ndarray:
        """All vectors in memory as one float32 array (for exact in-memory search of small sets)."""
        if not self.files:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self.shard_vectors(i) for i in range(len(self.files))])

    def vectors_at(self, positions: np.ndarray, chunk: int = 16384) -> np.ndarray:
        """Float32 vectors at ``positions`` (any shape; ``-1`` gives zeros). Each shard is mapped only
        while ``chunk`` sorted rows are copied out, so the resident set grows by at most ``chunk`` pages."""
        pos = np.asarray(positions, dtype=np.int64)
        flat = pos.reshape(-1)
        out = np.zeros((flat.size, self.dim), np.float32)
        valid = np.flatnonzero((flat >= 0) & (flat < self.ntotal))
        if valid.size:
            shard = np.searchsorted(self.starts, flat[valid], side="right") - 1
            for i in np.unique(shard):
                sel = valid[shard == i]
                local = flat[sel] - self.starts[i]
                order = np.argsort(local, kind="stable")
                for c in range(0, len(order), chunk):
                    part = order[c : c + chunk]
                    mapped = np.load(self.files[i], mmap_mode="r")
                    out[sel[part]] = mapped[local[part]]
                    del mapped  # unmapped: its pages leave this process's resident set
        return out.reshape(*pos.shape, self.dim)

    def metadata_file(self, k: int) -> Path:
        """The metadata parquet of shard number ``k`` (as found, any padding; else diffmem's name)."""
        return self._metadata.get(k, self.root / "metadata" / f"{shard_name('metadata', k)}.parquet")

    def metadata_columns(self) -> list[str]:
        """The column names of the metadata (those of the first shard's file; none without metadata)."""
        import pyarrow.parquet as pq

        for k in self.shards:
            if self.metadata_file(k).is_file():
                return list(pq.read_schema(self.metadata_file(k)).names)
        return []

    def metadata_column(self, name: str):
        """One metadata column over all shards, in position order (a pyarrow ChunkedArray)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        chunks = []
        for k in self.shards:
            t = pq.read_table(self.metadata_file(k), columns=[name])
            chunks.extend(t.column(name).chunks)
        return pa.chunked_array(chunks, type=chunks[0].type if chunks else pa.string())

    def id_column(self) -> str | None:
        """The metadata column that names each vector: diffmem's ``id``, else img2dataset's ``key``
        (which clip-retrieval carries over); ``None``: the position is the id."""
        columns = self.metadata_columns()
        return next((c for c in ("id", "key") if c in columns), None)

    def rows(self) -> np.ndarray:
        """Each position's source row: the ``row`` column where there is one (``diffmem embed``), else
        the position itself."""
        if self.ntotal and "row" in self.metadata_columns():
            return self.metadata_column("row").to_numpy()
        return np.arange(self.ntotal, dtype=np.int64)

    def bad_images(self) -> list[dict]:
        """Rows whose image did not load, over all shards (``diffmem.scan.bad_rows`` records)."""
        import pyarrow.parquet as pq

        out: list[dict] = []
        found = find_shard_files(self.root / "bad_images", "bad_images", ".parquet", "--train-embeddings")
        for k in self.shards:
            path = found.get(k)
            if path is not None:
                out.extend(pq.read_table(path).to_pylist())
        return out
