"""Build time of each ``diffmem index --kind`` on small layouts, and what the 8-bit IVF-PQ's polysemous
training (faiss's default for ``IndexIVFPQ``, turned off by ``build_index_file``) used to cost.

For each size ``(n, d)``: a float16 layout of ``bench_ann.mixture`` vectors; ``build_index_file`` for
every kind (``flat``, ``ivfpq``, ``ivfpq8``, ``hnsw``), timed; then the ``ivfpq8`` factory trained on the
same sample with ``do_polysemous_training`` on (the build before) and off, timed, and both searched with
the same queries (the permutation polysemous training learns only reorders the codes: at
``polysemous_ht = 0`` the neighbours should agree).

    .venv/bin/python benchmarks/bench_index_build.py --sizes 320x512 20000x128 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from diffmem.scan.index_file import _sample_positions, build_index_file, index_parameters
from diffmem.scan.layout import write_vectors

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

KINDS = ("flat", "ivfpq", "ivfpq8", "hnsw")


def _polysemous_pair(layout, params: dict, seed: int) -> dict:
    """Train the ``ivfpq8`` factory with and without polysemous training on the same sample; time both
    and compare the neighbours of 200 queries."""
    import faiss

    sample = layout.vectors_at(_sample_positions(layout.ntotal, params["train_size"], seed))
    queries = sample[:200] + 0.05 * np.random.default_rng(1).standard_normal((200, layout.dim), np.float32)
    out, found = {}, {}
    for poly in (True, False):
        index = faiss.index_factory(layout.dim, params["factory"], faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        ivf.do_polysemous_training = poly
        t = time.perf_counter()
        index.train(sample)
        out["train_s_polysemous" if poly else "train_s_without"] = round(time.perf_counter() - t, 3)
        for _, block in layout.iter_vectors():
            index.add(block)
        ivf.nprobe = params["nprobe"]
        found[poly] = index.search(queries, 10)[1]
    out["top1_agreement"] = float((found[True][:, 0] == found[False][:, 0]).mean())
    out["top10_agreement"] = float((found[True] == found[False]).mean())
    return out


def run_size(n: int, d: int, seed: int, work: Path, before: bool) -> dict:
    from bench_ann import mixture

    work.mkdir(parents=True, exist_ok=True)
    layout = write_vectors(work / f"emb_{n}x{d}", mixture(n, d, 0, 64), {"embedder": "synthetic"})
    res: dict = {"n": n, "dim": d, "kinds": {}}
    for kind in KINDS:
        t = time.perf_counter()
        record = build_index_file(
            layout, work / f"{kind}_{n}x{d}.index", kind=kind, seed=seed, progress=False
        )
        res["kinds"][kind] = {
            "factory": record["factory"],
            "build_s": round(time.perf_counter() - t, 3),
            "train_s": record["train_seconds"],
            "bytes": record["bytes"],
        }
        print(n, d, kind, res["kinds"][kind], flush=True)
    if before:
        res["ivfpq8_polysemous"] = _polysemous_pair(layout, index_parameters(n, d, "ivfpq8"), seed)
        print(n, d, "polysemous", res["ivfpq8_polysemous"], flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["320x512", "20000x128"], help="NxD layouts")
    p.add_argument("--no-before", action="store_true", help="skip the polysemous (old) 8-bit training")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_index_build.json")
    a = p.parse_args()
    import faiss
    from machine import cpu_model

    faiss.omp_set_num_threads(a.threads)
    results = {"cpu": cpu_model(), "threads": a.threads, "faiss": faiss.__version__, "sizes": []}
    with tempfile.TemporaryDirectory() as tmp:
        run_size(300, 16, a.seed, Path(tmp) / "warmup", before=False)  # imports and first-call costs, untimed
        for size in a.sizes:
            n, d = (int(x) for x in size.split("x"))
            results["sizes"].append(run_size(n, d, a.seed, Path(tmp), not a.no_before))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
