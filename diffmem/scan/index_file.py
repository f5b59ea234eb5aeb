"""A faiss index over an embedding layout, built shard by shard and searched memory-mapped from disk.

``build_index_file(layout, path)`` writes the index to ``path`` and its record to ``path + ".json"``
(the embedder and preprocessing, the layout it indexes, the parameters, the build cost); an index
without its record is not read. Parameters come from the number of vectors ``n`` (``index_parameters``):

- ``n <= EXACT_MAX``: ``Flat``, exact inner product;
- otherwise ``IVF{nlist},PQ{m}x4fs``: ``nlist`` the power of two nearest ``sqrt(n)`` (at least 39
  training points per list), ``m = d / 4`` sub-quantizers of 4 bits, searched with faiss's SIMD
  "fast scan" (``d/8`` bytes per vector, 1/16 of float16), trained on ``max(64 * nlist, 100_000)``
  vectors sampled with the seed, searched with ``nprobe = max(16, nlist // 64)``. (Fewer lists than
  autofaiss's rule of ``4..16 sqrt(n)``: on a few CPU cores k-means over that many lists costs more than
  the search it saves; measured in RESULTS.)
- ``kind="ivfpq8"``: the same with ``m = d / 8`` sub-quantizers of 8 bits (``IVF{nlist},PQ{m}``, the same
  bytes per vector): the kind faiss can move to a GPU, slower on a CPU (RESULTS).
- ``kind="hnsw"``: ``HNSW32,Flat`` (graph search; holds the full vectors in memory, no memory-mapping).

Search is approximate: a scan re-ranks each query's ``rerank`` best candidates exactly from the stored
vectors (``diffmem.scan.training``), so reported similarities are exact inner products.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.io import atomic_write, atomic_write_json
from diffmem.scan.index import _faiss as optional_faiss
from diffmem.scan.layout import EmbeddingLayout

FORMAT = "diffmem-faiss-index/1"
#: up to this many vectors ``kind="auto"`` builds an exact index
EXACT_MAX = 200_000
INDEX_KINDS = ("auto", "flat", "ivfpq", "ivfpq8", "hnsw")
#: the kinds with inverted lists (``nprobe``)
IVF_KINDS = ("ivfpq", "ivfpq8")


def _faiss():
    faiss = optional_faiss()
    if faiss is None:
        raise ImportError("faiss is not installed: pip install 'diffmem[scan]'")
    return faiss


def index_parameters(n: int, d: int, kind: str = "auto") -> dict[str, Any]:
    """The factory string and search parameters for ``n`` vectors of dimension ``d`` (the rule above)."""
    if kind not in INDEX_KINDS:
        raise ValueError(f"--kind: expected one of {', '.join(INDEX_KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "flat" if n <= EXACT_MAX else "ivfpq"
    if kind == "flat":
        return {"kind": "flat", "factory": "Flat"}
    if kind == "hnsw":
        return {"kind": "hnsw", "factory": "HNSW32,Flat", "efSearch": 128}
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(n)))))
    nlist = max(1, min(nlist, n // 39))
    bits = 4 if kind == "ivfpq" else 8
    per_byte = 8 // bits  # sub-quantizers per byte of code
    m = next(c for c in (d // 8 * per_byte, d // 4, d // 2, d) if c >= 1 and d % c == 0)
    if bits == 4 and m % 2:
        m = d  # fast scan packs two 4-bit codes a byte
    return {
        "kind": kind,
        "factory": f"IVF{nlist},PQ{m}x4fs" if bits == 4 else f"IVF{nlist},PQ{m}",
        "nlist": nlist,
        "m": m,
        "bits": bits,
        "nprobe": min(nlist, max(16, nlist // 64)),
        "train_size": min(n, max(64 * nlist, 100_000)),
    }


def _sample_positions(n: int, size: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def build_index_file(
    layout: EmbeddingLayout,
    path: str | os.PathLike,
    *,
    kind: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Build an index over ``layout`` (one block of vectors in memory at a time, besides the training
    sample) and commit ``path`` and ``path.json``; returns the record."""
    from tqdm.auto import tqdm

    faiss = _faiss()
    path = Path(path)
    n, d = layout.ntotal, layout.dim
    if n == 0:
        raise ValueError(f"--embeddings: {layout.root} holds no vectors")
    params = index_parameters(n, d, kind)
    t0 = time.perf_counter()
    index = faiss.index_factory(d, params["factory"], faiss.METRIC_INNER_PRODUCT)
    if params["kind"] in IVF_KINDS:
        sample = layout.vectors_at(_sample_positions(n, params["train_size"], seed))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        if hasattr(ivf, "do_polysemous_training"):
            # an 8-bit IndexIVFPQ trains a code permutation for polysemous filtering by default, which a
            # search with polysemous_ht = 0 (ours) never uses: 69 s of 70 on 3,000 vectors (RESULTS)
            ivf.do_polysemous_training = False
        index.train(sample)
        del sample
    train_s = time.perf_counter() - t0
    with tqdm(total=n, desc="adding vectors", unit="vec", disable=not progress) as bar:
        for _, block in layout.iter_vectors(batch=1 << 18):
            index.add(block)
            bar.update(len(block))
    build_s = time.perf_counter() - t0
    if params["kind"] in IVF_KINDS:
        faiss.extract_index_ivf(index).nprobe = params["nprobe"]
    if params["kind"] == "hnsw":
        index.hnsw.efSearch = params["efSearch"]
    atomic_write(path, lambda tmp: faiss.write_index(index, tmp))
    record = {
        "format": FORMAT,
        "embeddings": str(layout.root.resolve()),
        "layout": layout.fingerprint(),
        "embedder": layout.embedder,
        "ntotal": n,
        "dim": d,
        "metric": "inner_product",
        **params,
        "seed": seed,
        "train_seconds": round(train_s, 3),
        "build_seconds": round(build_s, 3),
        "bytes": path.stat().st_size,
        "faiss": faiss.__version__,
    }
    atomic_write_json(Path(f"{path}.json"), record)
    return record


def read_index_record(path: str | os.PathLike, argument: str = "--train-index") -> dict[str, Any]:
    """The record of an index file (``path.json``); a clear error when it or the index is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} does not exist (build one with `diffmem index`)")
    rec_path = Path(f"{path}.json")
    if not rec_path.is_file():
        raise FileNotFoundError(
            f"{argument}: {path} has no record {rec_path.name} (which embedder and layout it indexes); "
            "build the index with `diffmem index`, or for an index built elsewhere (autofaiss) give "
            "--train-embeddings (the folder it indexes) and --train-embedder"
        )
    try:
        record = json.loads(rec_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{argument}: {rec_path} is not JSON ({err.msg})") from None
    if record.get("format") != FORMAT:
        raise ValueError(
            f"{argument}: {rec_path} is not a diffmem index record (format {record.get('format')!r})"
        )
    return record


#: ``kind`` of an index diffmem did not build (its record is made up from the index itself)
FOREIGN = "foreign"


def _read_index(faiss, path: Path, mmap: bool, argument: str, remedy: str):
    """``faiss.read_index``, memory-mapped where faiss can map this kind of index; a file faiss cannot read
    (other bytes, truncated, damaged) is one clear line naming it and ``remedy``."""
    try:
        if mmap:
            try:
                return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
            except RuntimeError:  # an index type faiss cannot map: read it into memory
                pass
        return faiss.read_index(str(path))
    except RuntimeError:  # faiss's C++ exception: a multi-line message with its source location
        raise ValueError(
            f"{argument}: {path} is not a faiss index (or is truncated or damaged; "
            f"{path.stat().st_size} bytes); {remedy}"
        ) from None


def foreign_record(index, layout: EmbeddingLayout, path: Path, argument: str) -> dict[str, Any]:
    """A record for an index built outside diffmem (autofaiss's, LAION's released ones), checked against the
    layout it is said to index: the same number of vectors and dimension (its ids are the layout's
    positions, which autofaiss's are: it adds the shards in file order)."""
    faiss = _faiss()
    if index.d != layout.dim or index.ntotal != layout.ntotal:
        raise ValueError(
            f"{argument}: {path} holds {index.ntotal} vectors of dimension {index.d}, but {layout.root} holds "
            f"{layout.ntotal} of dimension {layout.dim}: it does not index these embeddings"
        )
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    record: dict[str, Any] = {
        "format": FOREIGN,
        "kind": FOREIGN,
        "index_type": type(faiss.downcast_index(index)).__name__,
        "embeddings": str(layout.root.resolve()),
        "embedder": layout.embedder,
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "metric": "inner_product" if index.metric_type == faiss.METRIC_INNER_PRODUCT else "l2",
    }
    if ivf is not None:
        # at least diffmem's own rule for its number of lists (an index saved with nprobe 1 misses a lot)
        rule = min(ivf.nlist, max(16, ivf.nlist // 64))
        record.update(nlist=int(ivf.nlist), nprobe=max(int(ivf.nprobe), rule))
    return record


class IndexFile:
    """A prebuilt index, read with ``faiss.IO_FLAG_MMAP`` (an 8-bit IVF-PQ's lists stay on disk and only the
    probed ones are read; faiss reads a fast-scan index's lists into memory); moved to the GPU when
    faiss-gpu and a CUDA device are there (8-bit and flat indices: faiss has no GPU fast scan)."""

    def __init__(
        self,
        path: str | os.PathLike,
        layout: EmbeddingLayout,
        *,
        nprobe: int | None = None,
        gpu_device: int | None = None,
        argument: str = "--train-index",
        foreign: bool = False,
    ):
        """``foreign``: an index without a diffmem record is read (its embedder declared on the layout,
        ``--train-embedder``) and checked against the layout's size and dimension; it stays on the CPU."""
        faiss = _faiss()
        path = Path(path)
        if foreign and path.is_file() and not Path(f"{path}.json").is_file():
            remedy = f"expected a faiss index of the embeddings in {layout.root}"
            index = _read_index(faiss, path, True, argument, remedy)
            self.record = foreign_record(index, layout, path, argument)
            gpu_device = None  # (no GPU run of a foreign index on record)
        else:
            self.record = read_index_record(path, argument)
            if self.record.get("layout") != layout.fingerprint():
                raise ValueError(
                    f"{argument}: {path} indexes another set of embeddings than {layout.root} "
                    f"({self.record['ntotal']} vectors there, {layout.ntotal} here, or other shards or embedder); "
                    "rebuild it with `diffmem index`"
                )
            mmap = self.record["kind"] != "hnsw"
            index = _read_index(faiss, path, mmap, argument, "rebuild it with `diffmem index`")
            if (int(index.ntotal), int(index.d)) != (layout.ntotal, layout.dim):
                raise ValueError(
                    f"{argument}: {path} holds {index.ntotal} vectors of {index.d}; its layout {layout.root} "
                    f"holds {layout.ntotal} of {layout.dim}; rebuild it with `diffmem index`"
                )
        if self.record["kind"] in IVF_KINDS or "nlist" in self.record:
            faiss.extract_index_ivf(index).nprobe = nprobe or self.record["nprobe"]
        self.on_gpu = False
        if self.record["kind"] == "ivfpq" and gpu_device is not None:  # faiss has no GPU fast-scan index
            import warnings

            warnings.warn(
                f"{argument}: {path} is a 4-bit fast-scan IVF-PQ index, which faiss searches on the CPU only; "
                "build it with `diffmem index --kind ivfpq8` to search on the GPU",
                stacklevel=2,
            )
            gpu_device = None
        if gpu_device is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, gpu_device, index)
            self.on_gpu = True
        self.index = index
        self.kind = self.record["kind"]
        self.ntotal = int(index.ntotal)
        self.dim = int(index.d)

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, positions)`` as the index scores them (approximate for IVF-PQ)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, min(k, self.ntotal))
