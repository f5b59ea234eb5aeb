"""Nearest-neighbour search for scans: faiss exact inner product vs a chunked torch matrix product.

Same run, same data: ``--n`` unit training descriptors of dimension ``--dim`` (random, float32) and
``--queries`` queries, each a noisy copy of a known training row (so the right answer is known).
Both searches return the top-1 training row of every query; the script checks they agree and that
they find the planted row, and times them. faiss runs with ``distance_compute_blas_threshold = 1``
(BLAS for every query batch; see /work/shared/reference/environment.md).

    .venv/bin/python benchmarks/bench_search.py --n 1000000 --dim 512 --queries 10000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.scan.index import FaissIndex, TorchIndex, _faiss


def unit_rows(n: int, d: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def planted_queries(base: np.ndarray, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, truth)``: each query a noisy unit copy of training row ``truth[i]`` (the known answer)."""
    n, dim = base.shape
    rng = np.random.default_rng(1)
    truth = rng.choice(n, queries, replace=False)
    q = base[truth] + 0.5 / np.sqrt(dim) * rng.standard_normal((queries, dim), dtype=np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, truth


def compare_searches(base: np.ndarray, q: np.ndarray, truth: np.ndarray, ivf: bool) -> dict:
    """Exact faiss against the chunked torch product (and an IVF index if ``ivf``): times and agreement."""
    result = {}
    t = time.perf_counter()
    index = FaissIndex(base, kind="flat", use_gpu=False)
    result["faiss_add_s"] = time.perf_counter() - t
    t = time.perf_counter()
    f_sims, f_pos = index.search(q, k=1)
    result["faiss_search_s"] = time.perf_counter() - t
    print(
        f"faiss IndexFlatIP: add {result['faiss_add_s']:.1f} s, search {result['faiss_search_s']:.1f} s",
        flush=True,
    )
    del index

    t = time.perf_counter()
    tindex = TorchIndex(base, chunk=131072, device="cpu")
    t_sims, t_pos = tindex.search(q, k=1, query_chunk=2048)
    result["torch_search_s"] = time.perf_counter() - t
    print(f"torch chunked matmul: search {result['torch_search_s']:.1f} s", flush=True)
    del tindex

    result["top1_agreement"] = float((f_pos[:, 0] == t_pos[:, 0]).mean())
    result["max_similarity_difference"] = float(np.abs(f_sims[:, 0] - t_sims[:, 0]).max())
    result["faiss_recall_of_planted_row"] = float((f_pos[:, 0] == truth).mean())
    result["torch_over_faiss_time"] = result["torch_search_s"] / result["faiss_search_s"]
    if ivf:
        t = time.perf_counter()
        index = FaissIndex(base, kind="ivf", nprobe=16, use_gpu=False)
        result["ivf_build_s"] = time.perf_counter() - t
        t = time.perf_counter()
        _, i_pos = index.search(q, k=1)
        result["ivf_search_s"] = time.perf_counter() - t
        result["ivf_recall_vs_exact"] = float((i_pos[:, 0] == f_pos[:, 0]).mean())
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ivf", action="store_true", help="also time an IVF index (nprobe 16)")
    p.add_argument("--json", default="benchmarks/results/bench_search.json")
    args = p.parse_args()

    faiss = _faiss()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    base = unit_rows(args.n, args.dim, 0)
    q, truth = planted_queries(base, args.queries)
    print(
        f"data: {args.n} x {args.dim} ({base.nbytes / 2**30:.2f} GiB), {time.perf_counter() - t:.1f} s",
        flush=True,
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "threads": args.threads,
        "faiss_version": faiss.__version__,
        "torch_version": torch.__version__,
        **compare_searches(base, q, truth, args.ivf),
    }
    print(json.dumps(result, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
