"""Prebuilt-index search for scans at scale: IVF-PQ (``diffmem index``) vs exact faiss vs chunked torch.

Same run, same data, each method in its own process (so each peak RSS is its own):

- ``--part 1m``: 1,000,000 x 512 training descriptors, 10,000 queries. Exact faiss (``IndexFlatIP``)
  gives the ground truth (top 10 of every query) and its queries/s; the chunked torch product is timed
  on ``--torch-queries`` of them; IVF-PQ with the library's parameters is built over the on-disk
  layout and searched memory-mapped at several ``nprobe``, with and without the exact re-rank.
- ``--part 10m``: 10,000,000 x 128 (float16 layout on disk, 2.4 GiB): the IVF-PQ index, and the
  search stage of a scan (``diffmem.scan.training.TrainingSet`` over the memory-mapped index, re-ranking
  from the layout): its peak RSS against the vectors' raw size, and recall against an exact torch
  search of ``--truth-queries`` queries.
- ``--part laion``: the LAION workflow on files diffmem did not write. A 1,000,000 x 512 folder as
  ``clip-retrieval inference`` writes it (``img_emb/img_emb_0.npy`` float16, ``metadata/metadata_0.parquet``
  with ``image_path``, ``caption``, ``url``, ``key``; no ``embeddings.json``) and an index built from it with
  faiss alone as autofaiss builds LAION's (``--factory``, default ``OPQ16_64,IVF4096,PQ16x8``, inner
  product, an ``IndexIVFPQ`` without the polysemous training autofaiss's constructor leaves off, trained on
  the first ``100 * nlist`` vectors as autofaiss's ``get_optimal_train_size``, written with
  ``faiss.write_index``, no diffmem record). Then the search stage a scan runs against them (the embedder
  declared, ``TrainingSet(..., foreign_index=True)``), recall against an exact torch search of
  ``--torch-queries`` queries, and one ``diffmem scan`` end to end (``--scan-prompts`` organism captions,
  one generation each, ``--embedder clip --embedder-arch ViT-B-32`` on a checkpoint of random weights the
  script writes: its neighbours mean nothing, only the timings and the plumbing count).

The descriptors are synthetic but shaped like image descriptors: unit vectors from a mixture of
``--clusters`` centres with low-rank (32-d) spread plus isotropic noise. Half the queries are
near-copies of training vectors (cosine ~0.9: what a replicated generation looks like), half fresh
draws from the mixture (nearest neighbour often ambiguous); recall is reported for both.

    .venv/bin/python benchmarks/bench_ann.py --part 1m --threads 2
    .venv/bin/python benchmarks/bench_ann.py --part 10m --threads 2
    .venv/bin/python benchmarks/bench_ann.py --part laion --threads 1
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.organism.data import build_organism_data
from diffmem.organism.recipe import recipe_of
from diffmem.scan.index import FaissIndex, TorchIndex
from diffmem.scan.index_file import build_index_file
from diffmem.scan.layout import EmbeddingLayout, write_vectors
from diffmem.scan.results import load_results
from diffmem.scan.training import TrainingSet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def mixture(n: int, d: int, seed: int, clusters: int, chunk: int = 500_000):
    """Blocks of unit vectors: centre + 32-d low-rank spread + isotropic noise (fixed by ``seed``)."""
    g = np.random.default_rng(12345)  # the mixture itself is the same for every call
    centres = g.standard_normal((clusters, d)).astype(np.float32)
    basis = g.standard_normal((32, d)).astype(np.float32) / np.sqrt(32)
    rng = np.random.default_rng(seed)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, clusters, m)]
        x += 0.8 * rng.standard_normal((m, 32), dtype=np.float32) @ basis * np.sqrt(d / 32)
        x += 0.3 * rng.standard_normal((m, d), dtype=np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def _rss() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _gib(b: float) -> float:
    return round(b / 2**30, 3)


# ----------------------------------------------------------------------------------------- stages


#: the clip-retrieval folder (``--part laion``) and the index built over it outside diffmem
LAION_FOLDER = "laion-emb"
LAION_INDEX = "knn.index"


def _layout(a) -> EmbeddingLayout:
    """The training layout of the part: diffmem's own, or (``laion``) clip-retrieval's with the embedder declared."""
    if a.part == "laion":
        return EmbeddingLayout(a.work / LAION_FOLDER, declared=a.train_embedder)
    return EmbeddingLayout(a.work / "emb")


def _write_queries(a, layout: EmbeddingLayout) -> dict:
    """``queries.npy``: half near-copies of training vectors (cosine ~0.9), half fresh mixture draws."""
    rng = np.random.default_rng(1)
    half = a.queries // 2
    src = np.sort(rng.choice(a.n, half, replace=False))
    copies = layout.vectors_at(src)
    copies += 0.48 / np.sqrt(a.dim) * rng.standard_normal(copies.shape, dtype=np.float32)  # cosine ~0.9
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    fresh = next(mixture(a.queries - half, a.dim, 2, a.clusters))
    q = np.concatenate([copies, fresh]).astype(np.float32)
    np.save(a.work / "queries.npy", q)
    np.save(a.work / "copy_sources.npy", src)
    return {"copy_cosine": float(np.mean(np.sum(copies * layout.vectors_at(src), axis=1)))}


def stage_prepare(a) -> dict:
    t = time.perf_counter()
    layout = write_vectors(a.work / "emb", mixture(a.n, a.dim, 0, a.clusters), {"embedder": "synthetic"})
    write_s = time.perf_counter() - t
    return {
        "write_s": write_s,
        "layout_bytes": int(sum(p.stat().st_size for p in layout.files)),
        **_write_queries(a, layout),
    }


def stage_laion_prepare(a) -> dict:
    """The vectors as ``clip-retrieval inference`` writes them: one partition, so ``img_emb_0.npy`` (float16)
    and ``metadata_0.parquet`` with its columns (``image_path``, ``caption``, ``url``, img2dataset's ``key``);
    no ``embeddings.json``. The image paths point nowhere (LAION's images are URLs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = a.work / LAION_FOLDER
    if root.exists():
        shutil.rmtree(root)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    t = time.perf_counter()
    npy = np.lib.format.open_memmap(
        root / "img_emb" / "img_emb_0.npy", mode="w+", dtype=np.float16, shape=(a.n, a.dim)
    )
    start = 0
    for block in mixture(a.n, a.dim, 0, a.clusters):
        npy[start : start + len(block)] = block
        start += len(block)
    npy.flush()
    del npy
    keys = [f"{i:09d}" for i in range(a.n)]
    table = pa.table(
        {
            "image_path": [f"/laion/{k[:5]}/{k}.jpg" for k in keys],
            "caption": [f"synthetic caption {i}" for i in range(a.n)],
            "url": [f"https://example.com/{k}.jpg" for k in keys],
            "key": keys,
        }
    )
    pq.write_table(table, root / "metadata" / "metadata_0.parquet")
    write_s = time.perf_counter() - t
    files = [*root.glob("img_emb/*"), *root.glob("metadata/*")]
    return {
        "write_s": write_s,
        "layout_bytes": int(sum(p.stat().st_size for p in files)),
        "files": sorted(str(p.relative_to(root)) for p in files),
        **_write_queries(a, _layout(a)),
    }


def stage_laion_build(a) -> dict:
    """The index built outside diffmem, with faiss alone, as autofaiss builds LAION's: ``--factory`` with
    inner product, trained on the first ``min(100 * nlist, n)`` vectors (autofaiss's
    ``get_optimal_train_size``: 100 points a list, read from the start), the vectors added in file order
    (ids = positions), written with ``faiss.write_index`` and no record. autofaiss makes its
    ``IndexIVFPQ`` with the constructor, which leaves the polysemous code training off; faiss's factory
    string turns it on, so it is turned off here to build the same index."""
    import faiss

    vecs = np.load(a.work / LAION_FOLDER / "img_emb" / "img_emb_0.npy", mmap_mode="r")
    n, d = vecs.shape
    nlist = int(re.search(r"IVF(\d+)", a.factory).group(1))
    train_size = min(100 * nlist, n)
    index = faiss.index_factory(d, a.factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    t = time.perf_counter()
    sample = np.asarray(vecs[:train_size], dtype=np.float32)
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    index.train(sample)
    train_s = time.perf_counter() - t
    del sample
    t = time.perf_counter()
    for s in range(0, n, 1 << 17):
        index.add(np.asarray(vecs[s : s + (1 << 17)], dtype=np.float32))
    add_s = time.perf_counter() - t
    path = a.work / LAION_INDEX
    t = time.perf_counter()
    faiss.write_index(index, str(path))
    write_s = time.perf_counter() - t
    return {
        "factory": a.factory,
        "index_type": type(faiss.downcast_index(index)).__name__,
        "nlist": nlist,
        "train_size": train_size,
        "saved_nprobe": int(ivf.nprobe),
        "polysemous_training": bool(getattr(ivf, "do_polysemous_training", False)),
        "read_sample_s": read_s,
        "train_s": train_s,
        "add_s": add_s,
        "write_s": write_s,
        "bytes": path.stat().st_size,
    }


def stage_exact(a) -> dict:
    layout = _layout(a)
    q = np.load(a.work / "queries.npy")[: a.limit or None]
    t = time.perf_counter()
    index = FaissIndex(layout.all_vectors(), kind="flat", use_gpu=False)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    sims, pos = index.search(q, k=10)
    search_s = time.perf_counter() - t
    np.save(a.work / "truth.npy", pos)
    return {"build_s": build_s, "search_s": search_s, "queries": len(q), "qps": len(q) / search_s}


def stage_torch(a) -> dict:
    layout = _layout(a)
    q = np.load(a.work / "queries.npy")
    take = np.linspace(0, len(q) - 1, a.torch_queries).astype(int)  # both query kinds
    if a.streaming:  # exact truth without holding the vectors: a running top-k over the layout's blocks
        t = time.perf_counter()
        best_s = np.full((len(take), 10), -np.inf, np.float32)
        best_p = np.full((len(take), 10), -1, np.int64)
        for start, block in layout.iter_vectors(batch=1 << 20):
            s, p = TorchIndex(block, chunk=131072).search(q[take], k=10)
            cat_s, cat_p = np.concatenate([best_s, s], 1), np.concatenate([best_p, p + start], 1)
            order = np.argsort(-cat_s, axis=1, kind="stable")[:, :10]
            best_s, best_p = np.take_along_axis(cat_s, order, 1), np.take_along_axis(cat_p, order, 1)
        search_s = time.perf_counter() - t
        np.save(a.work / "truth.npy", best_p)
        np.save(a.work / "truth_rows.npy", take)
        return {"build_s": 0.0, "search_s": search_s, "queries": len(take), "qps": len(take) / search_s}
    t = time.perf_counter()
    index = TorchIndex(layout.all_vectors(), chunk=131072)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    _, pos = index.search(q[take], k=10)
    search_s = time.perf_counter() - t
    truth = np.load(a.work / "truth.npy")[take]
    return {
        "build_s": build_s,
        "search_s": search_s,
        "queries": len(take),
        "qps": len(take) / search_s,
        "top1_agrees_with_faiss": float((pos[:, 0] == truth[:, 0]).mean()),
    }


def stage_build(a) -> dict:
    record = build_index_file(
        EmbeddingLayout(a.work / "emb"), a.work / "ivfpq.index", kind=a.kind, progress=False
    )
    return {
        k: record[k]
        for k in ("factory", "nlist", "m", "nprobe", "train_size", "train_seconds", "build_seconds", "bytes")
    }


def _recall(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """``k``-recall@``k``: the mean fraction of the exact top ``k`` found among the first ``k`` (for
    ``k = 1``: whether the exact nearest neighbour comes first)."""
    return float(np.mean([len(set(found[i, :k]) & set(truth[i, :k])) / k for i in range(len(truth))]))


def stage_search(a) -> dict:
    """The search stage of a scan over the prebuilt index: TrainingSet (index memory-mapped, re-rank
    from the layout with pread), as ``diffmem scan --train-index`` runs it."""

    q = np.load(a.work / "queries.npy")
    rows = np.load(a.work / "truth_rows.npy") if (a.work / "truth_rows.npy").is_file() else np.arange(len(q))
    truth = np.load(a.work / "truth.npy")
    laion = a.part == "laion"
    start = _rss()
    t = time.perf_counter()
    train = TrainingSet(  # the layout's metadata (ids, rows, paths) is read here too, as a scan does
        _layout(a),
        index_file=str(a.work / (LAION_INDEX if laion else "ivfpq.index")),
        rerank=a.rerank,
        index_nprobe=a.nprobe,
        foreign_index=laion,  # an index without a diffmem record, its embedder declared on the folder
    )
    open_s = time.perf_counter() - t
    t = time.perf_counter()
    if a.rerank:
        _, pos = train.search(q, k=10)
    else:
        _, pos = train.index.search(q, k=10)
    search_s = time.perf_counter() - t
    end = _rss()
    half = len(q) // 2
    is_copy = rows < half
    found = pos[rows]
    return {
        "nprobe": a.nprobe or train.index.record["nprobe"],
        "rerank": a.rerank,
        "open_s": open_s,
        "search_s": search_s,
        "queries": len(q),
        "qps": len(q) / search_s,
        "recall_at_1": _recall(found, truth, 1),
        "recall_at_10": _recall(found, truth, 10),
        "recall_queries": len(rows),
        "recall_at_1_copies": _recall(found[is_copy], truth[is_copy], 1),
        "recall_at_1_fresh": _recall(found[~is_copy], truth[~is_copy], 1),
        "rss_before_bytes": start["VmRSS"],
        "rss_end_anon_bytes": end["RssAnon"],
        "rss_end_file_bytes": end["RssFile"],
    }


def stage_laion_scan(a) -> dict:
    """One ``diffmem scan`` end to end against the folder and the index built outside diffmem: a subprocess
    (its peak RSS is this process's children's), ``--scan-prompts`` organism captions, one generation each,
    the recipe's steps and guidance, ``--embedder clip`` on an open_clip checkpoint of random weights
    written here as safetensors (its neighbours mean nothing; the timings and the plumbing count)."""
    import open_clip
    from safetensors.torch import save_file

    weights = a.work / f"{a.scan_arch.lower()}-random.safetensors"
    if not weights.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(a.scan_arch, pretrained=None)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
        del model
    recipe = recipe_of(a.scan_model)
    data = build_organism_data(recipe)
    roles = ("verbatim", "template", "heldout", "generic")
    per_role = -(-a.scan_prompts // len(roles))
    captions = [c for role in roles for c in data.captions(role)[:per_role]][: a.scan_prompts]
    prompts = a.work / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "caption"])
        writer.writerows((f"p{i}", c) for i, c in enumerate(captions))
    out = a.work / "scan"
    if out.exists():
        shutil.rmtree(out)  # timed from the start, not resumed
    cmd = [sys.executable, "-m", "diffmem", "scan", "--data", str(prompts), "--out", str(out),
           "--model", str(a.scan_model), "--num-gens", "1", "--steps", str(recipe.num_inference_steps),
           "--guidance-scale", str(recipe.guidance_scale), "--embedder", "clip", "--embedder-arch", a.scan_arch,
           "--embedder-file", str(weights), "--train-embeddings", str(a.work / LAION_FOLDER),
           "--train-index", str(a.work / LAION_INDEX), "--train-embedder", a.train_embedder,
           "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    t = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall_s = time.perf_counter() - t
    if run.returncode != 0:
        raise SystemExit(f"diffmem scan failed (exit {run.returncode}):\n{run.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    gens = load_results(out)["gens"].to_pylist()
    return {
        "command": " ".join(cmd[1:]),
        "captions": len(captions),
        "generations": len(gens),
        "with_neighbour": sum(g["nn_id"] is not None for g in gens),
        "nn_ids": [g["nn_id"] for g in gens],
        "wall_s": wall_s,
        "timings": json.loads((out / "timings.json").read_text()),
        "scan_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "summary_keys": sorted(summary),
    }


STAGES = {
    "prepare": stage_prepare,
    "laion_prepare": stage_laion_prepare,
    "laion_build": stage_laion_build,
    "laion_scan": stage_laion_scan,
    "exact": stage_exact,
    "torch": stage_torch,
    "build": stage_build,
    "search": stage_search,
}


def run_stage(a, stage: str, **extra) -> dict:
    """Run one stage in a fresh process; its result with that process's peak RSS (VmHWM)."""
    cmd = [sys.executable, __file__, "--stage", stage, "--work", str(a.work), "--n", str(a.n), "--dim", str(a.dim),
           "--queries", str(a.queries), "--clusters", str(a.clusters), "--threads", str(a.threads),
           "--torch-queries", str(a.torch_queries), "--kind", a.kind, "--part", a.part, "--factory", a.factory,
           "--train-embedder", a.train_embedder, "--scan-prompts", str(a.scan_prompts),
           "--scan-model", str(a.scan_model), "--scan-arch", a.scan_arch]  # fmt: skip
    for k, v in extra.items():
        if v is True:
            cmd.append(f"--{k.replace('_', '-')}")
        elif v is not None and v is not False:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    print("  ", stage, extra or "", flush=True)
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t
    print("     ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}, flush=True)
    return result


def arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("1m", "10m", "laion"), default=None)
    p.add_argument("--stage", choices=tuple(STAGES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/bench_ann_<part>)")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--clusters", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-queries", type=int, default=1000)
    p.add_argument("--nprobes", default=None, help="comma-separated nprobe values to search with")
    p.add_argument("--nprobe", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rerank", type=int, default=64)
    p.add_argument(
        "--kind", default="ivfpq", help="diffmem index --kind of the approximate index (default ivfpq)"
    )
    p.add_argument(
        "--factory",
        default="OPQ16_64,IVF4096,PQ16x8",
        help="--part laion: faiss factory string of the index built outside diffmem (LAION's kind)",
    )
    p.add_argument(
        "--train-embedder", default="open_clip:ViT-B-32", help="--part laion: the embedder declared"
    )
    p.add_argument("--scan-prompts", type=int, default=8, help="--part laion: captions the scan generates")
    p.add_argument("--scan-model", type=Path, default=HERE.parent / "weights" / "diffmem-organism-v2")
    p.add_argument(
        "--scan-arch", default="ViT-B-32", help="--part laion: open_clip architecture (random weights)"
    )
    p.add_argument("--limit", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--rebuild", action="store_true", help="with --reuse: build the approximate index again")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the data, ground truth and index of the last run; search again",
    )
    return p


def build_stages(a, result: dict, out: Path) -> None:
    """Data, ground truth and the approximate index into ``result`` (each stage in its own process); with
    ``--reuse`` the records of the last run in ``out`` instead (the index built again with ``--rebuild``)."""
    if a.reuse:  # the earlier stages' records; the searches are run again
        earlier = json.loads(out.read_text())
        result.update({k: v for k, v in earlier.items() if k not in result and k != "ivfpq_search"})
        result["reused_from"] = earlier["date"]
        if a.rebuild:
            result["ivfpq_build"] = run_stage(a, "build")
        return
    result["prepare"] = run_stage(a, "prepare")
    if a.part == "1m":
        result["exact_faiss"] = run_stage(a, "exact")
        result["torch"] = run_stage(a, "torch")
    else:
        result["exact_torch_streaming"] = run_stage(a, "torch", streaming=True)
    result["ivfpq_build"] = run_stage(a, "build")


def nprobe_searches(a, default_nprobe: int) -> list[dict]:
    """The scan's search stage without re-rank at the index's ``nprobe``, then with re-rank at each
    ``--nprobes`` (default: 1, 2, 4 and 8 times the index's)."""
    nprobes = (
        [int(x) for x in a.nprobes.split(",")]
        if a.nprobes
        else sorted({default_nprobe, 2 * default_nprobe, 4 * default_nprobe, 8 * default_nprobe})
    )
    searches = [run_stage(a, "search", nprobe=default_nprobe, rerank=0)]
    return searches + [run_stage(a, "search", nprobe=n, rerank=a.rerank) for n in nprobes]


def main() -> None:
    p = arguments()
    a = p.parse_args()
    import faiss  # optional dependency (diffmem's scans fall back to torch without it): only runs need it

    faiss.omp_set_num_threads(a.threads)
    torch.set_num_threads(a.threads)
    if a.stage:
        result = STAGES[a.stage](a)
        result.update(peak_rss_bytes=_rss()["VmHWM"])
        print(json.dumps(result))
        return
    if a.part is None:
        p.error("--part: expected 1m, 10m or laion")
    a.n = a.n or (10_000_000 if a.part == "10m" else 1_000_000)
    a.dim = a.dim or (128 if a.part == "10m" else 512)
    a.work = a.work or Path(f"/tmp/bench_ann_{a.part}")
    a.work.mkdir(parents=True, exist_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "load_average_at_start": os.getloadavg(),
        "threads": a.threads,
        "n": a.n,
        "dim": a.dim,
        "queries": a.queries,
        "clusters": a.clusters,
        "faiss": faiss.__version__,
        "kind": a.kind if a.part != "laion" else None,
        "raw_float32_bytes": a.n * a.dim * 4,
    }
    print(f"bench_ann {a.part}: {a.n} x {a.dim}, {a.queries} queries, work {a.work}", flush=True)
    out = Path(a.json or HERE / "results" / f"bench_ann_{a.part}.json")
    if a.part == "laion":
        laion_stages(a, result, out)
    else:
        build_stages(a, result, out)
        result["ivfpq_search"] = nprobe_searches(a, result["ivfpq_build"]["nprobe"])
    result["load_average_at_end"] = os.getloadavg()
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def laion_stages(a, result: dict, out: Path) -> None:
    """The clip-retrieval folder, the exact truth, the index built outside diffmem (or, ``--reuse``, those
    of the last run), then the scan's search stage at the index's nprobe without and with the re-rank
    (and at each ``--nprobes`` with it), and one ``diffmem scan`` end to end."""
    result.update(factory=a.factory, train_embedder=a.train_embedder)
    if a.reuse:
        earlier = json.loads(out.read_text())
        for k in ("prepare", "exact_torch_streaming", "build_outside_diffmem"):
            result[k] = earlier[k]
        result["reused_from"] = earlier["date"]
    else:
        result["prepare"] = run_stage(a, "laion_prepare")
        result["exact_torch_streaming"] = run_stage(a, "torch", streaming=True)
        result["build_outside_diffmem"] = run_stage(a, "laion_build")
    searches = [run_stage(a, "search", rerank=0), run_stage(a, "search", rerank=a.rerank)]
    for n in [int(x) for x in a.nprobes.split(",")] if a.nprobes else []:
        searches.append(run_stage(a, "search", nprobe=n, rerank=a.rerank))
    result["search"] = searches
    result["scan"] = run_stage(a, "laion_scan")


if __name__ == "__main__":
    main()
