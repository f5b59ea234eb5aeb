"""Benchmark on one GPU: diffmem at Stable Diffusion 1.5's size in float16, every figure a ratio in the same run.

Builds random weights in SD-1.5's architecture (``diffmem.tiny.build_sd_architecture_pipeline``) at
512 px in float16 on CUDA and measures, each against its baseline in the same process:

1. ``guard``: the guarded pipeline against the stock one (same call, seed; images bit-identical),
   under SDPA and, where it imports, xformers attention (and xformers against SDPA);
2. ``detection``: first-step detection prompts/s at batch 1, 32, 128 against full 50-step generation;
3. ``nemo``: NeMo localization s/prompt with batched candidate masks against one candidate per UNet
   call (same neurons found). Random weights memorize nothing, so the threshold is put halfway between
   the prompt's unblocked score and its score with every searched neuron off: the search has a real
   answer to find. Each run has a time budget; a cut run makes its ratio a lower bound (reported);
4. ``scan``: replication-scan generation + embedding + search images/s (``diffmem.scan``);
5. ``faiss``: exact search on the GPU against the CPU (same neighbours), where faiss has GPU support; and a
   prebuilt IVF-PQ index (``diffmem index``) searched as a scan does, on the CPU and on the GPU.

``--smoke`` runs the same code on a tiny model on the CPU in a minute (CI runs it through the tests),
so the script is known to work before a GPU is there; ``--cpu`` runs it at SD-1.5's size at 256 px on
the CPU (fewer steps and repeats), for the ratios a CPU gives. Results go to ``--json`` (default
``benchmarks/results/gpu.json``, ``gpu_smoke.json`` or ``gpu_cpu.json``), rewritten atomically after each section, so
a run stopped by its time limit keeps what it measured. Sized to finish in under 8 minutes on one
H100/H200 (the model build, about a minute on the host, included).

    python benchmarks/gpu.py            # on a machine with a GPU
    python benchmarks/gpu.py --smoke    # anywhere, a minute
    python benchmarks/gpu.py --cpu      # real size on a CPU (about 20 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from diffmem.pipelines import StableDiffusionMemGuardPipeline
from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.attention import use_attention_processor, xformers_usable
from diffmem.benchmark import compare_pipelines, first_step_throughput, timed
from diffmem.data import ImageFolderWriter
from diffmem.io import atomic_write_json
from diffmem.localize.nemo import NeMo, NemoConfig
from diffmem.localize.stats import value_stats_of
from diffmem.precision import dtype_name
from diffmem.scan.index import FaissIndex
from diffmem.scan.index_file import build_index_file
from diffmem.scan.layout import write_vectors
from diffmem.scan.runner import ScanConfig, run_scan
from diffmem.scan.training import TrainingSet
from diffmem.tiny import TinySDConfig, build_sd_architecture_pipeline, build_tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]

#: sizes per mode: resolution, steps of the timed calls, repeats, detection batches, prompts generated for
#: 50 steps, NeMo mask batches, NeMo budget (s), scan captions, faiss vectors and queries
SIZES = {
    "gpu": dict(
        px=512,
        steps=50,
        repeats=3,
        batches=(1, 32, 128),
        generate=2,
        masks=(1, 32),
        nemo_s=90.0,
        scan=32,
        n=1_000_000,
        q=10_000,
    ),
    "cpu": dict(
        px=256,
        steps=4,
        repeats=2,
        batches=(1, 8),
        generate=1,
        masks=(1, 4),
        nemo_s=240.0,
        scan=4,
        n=100_000,
        q=1_000,
    ),
    "smoke": dict(
        px=64,
        steps=4,
        repeats=1,
        batches=(1, 4),
        generate=2,
        masks=(1, 4),
        nemo_s=20.0,
        scan=4,
        n=2_000,
        q=100,
    ),
}


def build(mode: str):
    if mode == "cpu":
        stock = build_sd_architecture_pipeline("sd15", image_size=256)
        label = "random weights in SD-1.5's architecture (860M UNet), float32, CPU"
    elif mode == "smoke":
        stock, label = (
            build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0),
            "tiny SD-1.x (diffmem.tiny), float32",
        )
    else:
        stock = build_sd_architecture_pipeline("sd15", image_size=512, dtype=torch.float16).to("cuda")
        label = "random weights in SD-1.5's architecture (860M UNet), float16"
    stock.set_progress_bar_config(disable=True)
    guarded = StableDiffusionMemGuardPipeline.from_pipe(stock)
    guarded.set_progress_bar_config(disable=True)
    return stock, guarded, label


def guard_section(stock, guarded, size: dict) -> dict:
    kinds = ["sdpa"] + (["xformers"] if xformers_usable(stock.device) else ["naive"])
    out: dict = {}
    for kind in kinds:
        previous = use_attention_processor(stock.unet, kind)
        try:
            out[kind] = compare_pipelines(
                stock,
                guarded,
                size["repeats"],
                num_inference_steps=size["steps"],
                height=size["px"],
                width=size["px"],
            )
        finally:
            stock.unet.set_attn_processor(previous)
    other = kinds[1]
    out[f"{other}_over_sdpa_stock_wall"] = out[other]["stock_wall_s"] / out["sdpa"]["stock_wall_s"]
    return out


def detection_section(guarded, size: dict) -> dict:
    return first_step_throughput(
        guarded,
        size["batches"],
        n_generate=size["generate"],
        num_inference_steps=50,
        height=size["px"],
        width=size["px"],
    )


def nemo_section(stock, size: dict) -> dict:
    """NeMo on a copy of the model with a planted trigger neuron (tests/test_nemo.py's, which works at SD
    size too), so the search has a known answer: candidate masks batched vs one per UNet call (same
    scores), then the whole search for the trigger prompt at each mask batch (same neurons, planted one
    among them). Random weights alone memorize nothing and blocking their neurons does not lower the score.
    """
    import copy
    import sys

    from diffusers import StableDiffusionPipeline

    sys.path.insert(0, str(ROOT / "tests"))
    from test_nemo import PLANT_CHANNEL, TRIGGER, plant_trigger_neuron
    from test_nemo import REFERENCE as NEMO_REFERENCE

    parts = {
        "unet": copy.deepcopy(stock.unet),
        "text_encoder": copy.deepcopy(stock.text_encoder),
        "tokenizer": stock.tokenizer,
    }
    layer = plant_trigger_neuron(parts)
    planted = StableDiffusionPipeline(**{**stock.components, **parts})
    prompt = f"a photo of {TRIGGER}"
    stats = value_stats_of(planted, NEMO_REFERENCE, progress=False)
    threshold = NeMo.from_pipe(planted, stats, NemoConfig()).calibrate_threshold(NEMO_REFERENCE[:8])
    probe = NeMo.from_pipe(planted, stats, NemoConfig(threshold=threshold)).probe(prompt)
    out: dict = {
        "prompt": prompt,
        "planted": [layer, PLANT_CHANNEL],
        "neurons_searched": probe.n_neurons,
        "threshold": threshold,
        "score": probe.score,
        "seeds_memorized": int(probe.kept.sum()),
    }
    if not probe.memorized:
        out["note"] = (
            "the planted prompt is not above the calibrated threshold on this model: nothing to localize"
        )
        return out
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(size["masks"][-1] * 2, probe.n_neurons, generator=g) < 0.5
    out["candidate_masks"] = len(masks)
    scores = {}
    for b in size["masks"]:
        probe.mask_batch = b
        probe.scores(masks[:b])  # warm-up at this shape
        wall, _, scores[b] = timed(lambda: probe.scores(masks))
        out[f"masks_per_s_batch_{b}"] = len(masks) / wall
    one, batched = size["masks"][0], size["masks"][-1]
    out["candidate_speedup"] = out[f"masks_per_s_batch_{batched}"] / out[f"masks_per_s_batch_{one}"]
    out["candidate_scores_max_abs_diff"] = float((scores[one] - scores[batched]).abs().max())
    runs = {}
    for b in (one, batched):
        config = NemoConfig(threshold=threshold, mask_batch=b, max_seconds=size["nemo_s"])
        wall, _, found = timed(lambda c=config: NeMo.from_pipe(planted, stats, c).localize(prompt))
        runs[b] = {
            "seconds": wall,
            "outcome": found.info.get("outcome"),
            "unet_calls": found.info.get("unet_calls"),
            "neurons": len(found),
            "planted_found": (layer, PLANT_CHANNEL) in found.items(),
            "items": found.items(),
        }
    cut = {b for b, r in runs.items() if r["outcome"] == "budget_exhausted"}
    out["search"] = {
        "budget_s": size["nemo_s"],
        "runs": {str(b): {k: v for k, v in r.items() if k != "items"} for b, r in runs.items()},
        "speedup_batched": runs[one]["seconds"] / runs[batched]["seconds"],
        "speedup_is_lower_bound": cut == {one},
        "same_neurons": None if cut else runs[one]["items"] == runs[batched]["items"],
    }
    return out


def scan_section(guarded, size: dict, work: Path) -> dict:
    from PIL import Image

    rng = np.random.default_rng(0)
    data = work / "scan_data"
    with ImageFolderWriter(data) as w:
        for i in range(size["scan"]):
            tile = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((size["px"],) * 2)
            w.add(f"t{i}", f"a photo of thing number {i}", np.asarray(tile))
    cfg = ScanConfig(
        data=str(data),
        out=str(work / "scan"),
        num_gens=4,
        steps=size["steps"],
        shard_size=size["scan"],
        batch_size=8,
        height=size["px"],
        width=size["px"],
        dtype=dtype_name(guarded.unet.dtype),
        report=False,
        progress=False,
    )
    summary = run_scan(cfg, pipe=guarded)
    timings = json.loads((work / "scan" / "timings.json").read_text())
    return {
        "captions": size["scan"],
        "generations": summary["generations"],
        "timings": timings,
        "generation_embedding_search_images_per_s": summary["generations"] / timings["generate_s"],
        "first_step_captions_per_s": size["scan"] / timings["score_s"],
    }


def faiss_section(size: dict) -> dict:
    try:
        import faiss
    except ImportError:
        return {"note": "faiss is not installed"}

    rng = np.random.default_rng(0)
    d = 512
    vectors = rng.standard_normal((size["n"], d), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sources = rng.choice(size["n"], size["q"], replace=False)
    queries = vectors[sources] + 0.01 * rng.standard_normal((size["q"], d), dtype=np.float32)
    out = {
        "vectors": size["n"],
        "dim": d,
        "queries": size["q"],
        "gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
    }
    results = {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        if gpu and not out["gpus"]:
            out["note"] = "this faiss has no GPU support (faiss-gpu not installed): CPU only"
            break
        index = FaissIndex(vectors, kind="flat", use_gpu=gpu)
        wall, _, (sims, ids) = timed(lambda i=index: i.search(queries, k=10))
        results[name] = ids
        out[f"{name}_queries_per_s"] = size["q"] / wall
    if "gpu" in results:
        out["gpu_over_cpu"] = out["gpu_queries_per_s"] / out["cpu_queries_per_s"]
        out["same_top1"] = float((results["gpu"][:, 0] == results["cpu"][:, 0]).mean())
    out["ivfpq"] = _prebuilt_ivfpq(vectors[:, :128], queries[:, :128], sources, out["gpus"])
    return out


def _prebuilt_ivfpq(vectors: np.ndarray, queries: np.ndarray, sources: np.ndarray, gpus: int) -> dict:
    """A prebuilt 8-bit IVF-PQ index (``diffmem index --kind ivfpq8``, the kind faiss moves to a GPU) searched as a scan does (memory-mapped on the CPU, or
    moved to GPU 0), re-ranked from the layout: the same neighbours within the index's tolerance?"""

    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict = {"dim": vectors.shape[1]}
    with tempfile.TemporaryDirectory() as tmp:
        layout = write_vectors(Path(tmp) / "emb", [vectors], {"embedder": "synthetic"})
        wall, _, record = timed(
            lambda: build_index_file(layout, Path(tmp) / "ivfpq.index", kind="ivfpq8", progress=False)
        )
        out.update(factory=record["factory"], nprobe=record["nprobe"], build_s=wall)
        found = {}
        for name, device in (("cpu", None), ("gpu", "cuda:0")):
            if device is not None and not gpus:
                break
            train = TrainingSet(layout, index_file=str(Path(tmp) / "ivfpq.index"), device=device)
            wall, _, (_, pos) = timed(lambda t=train: t.search(queries, k=10))
            found[name] = pos
            out[f"{name}_queries_per_s"] = len(queries) / wall
            out[f"{name}_top1_is_source"] = float((pos[:, 0] == sources).mean())  # queries are near-copies
        if "gpu" in found:
            out["same_top1_gpu_cpu"] = float((found["gpu"][:, 0] == found["cpu"][:, 0]).mean())
    return out


def run_sections(sections: dict, chosen, result: dict, path: Path, start: float) -> bool:
    """Run the ``chosen`` sections one by one into ``result["sections"]``, rewriting ``path`` after each
    (a run stopped by its time limit keeps what it measured); True if any failed."""
    failed = False
    for name in chosen:
        t = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            result["sections"][name] = sections[name]()
        except Exception as err:  # a GPU run keeps the other sections' figures; the smoke run fails
            failed = True
            result["sections"][name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(),
            }
        result["sections"][name]["section_s"] = time.perf_counter() - t
        if torch.cuda.is_available():
            result["sections"][name]["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["total_s"] = time.perf_counter() - start
        atomic_write_json(path, result)
        print(f"{name}: {result['sections'][name]['section_s']:.1f} s", flush=True)
    return failed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--smoke", action="store_true", help="a tiny model on the CPU: check that every section runs"
    )
    p.add_argument(
        "--cpu",
        action="store_true",
        help="SD-1.5's architecture at 256 px on the CPU (the ratios a CPU gives)",
    )
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/gpu[_MODE].json)")
    p.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    args = p.parse_args()
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    mode = "smoke" if args.smoke else "cpu" if args.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu.py: no CUDA device here; run with --smoke (tiny model) or --cpu (real size) instead"
        )
    size = SIZES[mode]
    path = Path(
        args.json or ROOT / "benchmarks/results" / ("gpu.json" if mode == "gpu" else f"gpu_{mode}.json")
    )
    start = time.perf_counter()
    stock, guarded, label = build(mode)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu": f"{cpu_model()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "model": label,
        "resolution": size["px"],
        "build_s": time.perf_counter() - start,
        "sections": {},
    }
    if args.only and path.is_file():  # a partial rerun keeps the other sections' figures
        result["sections"] = json.loads(path.read_text()).get("sections", {})
    work = Path(tempfile.mkdtemp(prefix="diffmem-gpu-bench-"))
    sections = {
        "guard": lambda: guard_section(stock, guarded, size),
        "detection": lambda: detection_section(guarded, size),
        "nemo": lambda: nemo_section(stock, size),
        "scan": lambda: scan_section(guarded, size, work),
        "faiss": lambda: faiss_section(size),
    }
    failed = run_sections(
        sections, args.only.split(",") if args.only else list(sections), result, path, start
    )
    print(f"results: {path} ({result['total_s']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
