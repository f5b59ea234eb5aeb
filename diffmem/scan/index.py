"""Nearest-neighbour search of unit descriptors by inner product (= cosine).

``FaissIndex``: exact ``IndexFlatIP`` by default; ``IndexIVFFlat`` (inverted lists, approximate) as an
option, and chosen by ``kind="auto"`` past ``IVF_AUTO_SIZE`` descriptors, where exact search of
10,000 queries takes more than about ten minutes on a few CPU cores. On a machine with faiss-gpu and a
GPU the index is moved to the GPU(s). ``TorchIndex``: the same exact search as a chunked matrix
product with a running top-k (the baseline of ``benchmarks/bench_search.py``, and the fallback when
faiss is not installed).
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: ``kind="auto"`` switches from exact search to IVF past this many training descriptors.
IVF_AUTO_SIZE = 5_000_000


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    # small query batches: use BLAS instead of the per-query loop (much faster on CPU)
    faiss.cvar.distance_compute_blas_threshold = 1
    return faiss


class FaissIndex:
    """A faiss inner-product index over ``(n, d)`` float32 unit rows."""

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        nlist: int | None = None,
        nprobe: int = 16,
        seed: int = 0,
        use_gpu: bool | None = None,
        gpu_device: int | None = None,
    ):
        faiss = _faiss()
        if faiss is None:
            raise ImportError("faiss is not installed: pip install 'diffmem[scan]'")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        if kind == "auto":
            kind = "ivf" if n > IVF_AUTO_SIZE else "flat"
        if kind not in ("flat", "ivf"):
            raise ValueError(f"--index: unknown index kind {kind!r} (choose flat, ivf or auto)")
        self.kind = kind
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        else:
            nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = vectors[np.sort(rng.choice(n, size=min(n, 256 * nlist), replace=False))]
            index.cp.seed = seed
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        self.on_gpu = False
        if use_gpu is None:
            use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        if use_gpu and hasattr(faiss, "StandardGpuResources"):
            # one GPU per process under accelerate (gpu_device = the process's device), else all of them
            if gpu_device is not None:
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, gpu_device, index)
            else:
                index = faiss.index_cpu_to_all_gpus(index)
            self.on_gpu = True
        index.add(vectors)
        self.index = index
        self.ntotal = n
        self.dim = d

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, positions)``, each ``(n_queries, k)``, best first."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        sims, pos = self.index.search(q, min(k, self.ntotal))
        return sims, pos


class TorchIndex:
    """Exact inner-product search as a chunked matrix product with a running top-k (GPU when available)."""

    kind = "torch"

    def __init__(self, vectors: np.ndarray, chunk: int = 65536, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.vectors = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(self.device)
        self.chunk = chunk
        self.ntotal, self.dim = self.vectors.shape

    def search(
        self, queries: np.ndarray, k: int = 1, query_chunk: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.ntotal)
        q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        out_s, out_i = [], []
        for qs in range(0, len(q_all), query_chunk):
            q = q_all[qs : qs + query_chunk]
            best_s = torch.full((len(q), k), -math.inf, device=self.device)
            best_i = torch.full((len(q), k), -1, dtype=torch.long, device=self.device)
            for start in range(0, self.ntotal, self.chunk):
                sims = q @ self.vectors[start : start + self.chunk].T
                s, i = torch.topk(sims, min(k, sims.shape[1]), dim=1)
                cat_s = torch.cat([best_s, s], dim=1)
                cat_i = torch.cat([best_i, i + start], dim=1)
                best_s, sel = torch.topk(cat_s, k, dim=1)
                best_i = torch.gather(cat_i, 1, sel)
            out_s.append(best_s.cpu().numpy())
            out_i.append(best_i.cpu().numpy())
        return np.concatenate(out_s), np.concatenate(out_i)


def build_index(vectors: np.ndarray, kind: str = "flat", device=None, **kwargs):
    """A ``FaissIndex`` (``flat`` / ``ivf`` / ``auto``), or a ``TorchIndex`` for ``kind="torch"`` or
    when faiss is missing and exact search was asked for. ``device``: the process's torch device; a
    CUDA device puts the index on that GPU (faiss-gpu, or the torch search)."""
    device = torch.device(device) if device is not None else None
    cuda = device is not None and device.type == "cuda"
    if kind == "torch" or (_faiss() is None and kind in ("flat", "auto")):
        return TorchIndex(vectors, device=str(device) if cuda else None)
    if cuda:
        kwargs.setdefault("gpu_device", device.index or 0)
    return FaissIndex(vectors, kind=kind, **kwargs)


def nearest_other(
    index, vectors: np.ndarray, positions: np.ndarray, batch: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """For training descriptors ``vectors`` (at ``positions`` in ``index``): the most similar *other*
    training descriptor (Somepalli et al.'s background, self excluded). Returns ``(similarity, position)``."""
    sims_out = np.empty(len(vectors), dtype=np.float32)
    pos_out = np.empty(len(vectors), dtype=np.int64)
    for b in range(0, len(vectors), batch):
        sims, pos = index.search(vectors[b : b + batch], k=2)
        for r in range(len(sims)):
            me = positions[b + r]
            c = 0 if pos[r, 0] != me else 1
            if pos.shape[1] <= c or pos[r, c] < 0:
                sims_out[b + r], pos_out[b + r] = np.nan, -1
            else:
                sims_out[b + r], pos_out[b + r] = sims[r, c], pos[r, c]
    return sims_out, pos_out
