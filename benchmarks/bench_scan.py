"""Scan benchmarks: peak memory as the dataset grows, and scan throughput on CPU.

1. Memory (``--rss``): a first-step-score-only scan (``--generate none``) of N synthetic captions with the
   tiniest Stable Diffusion config and 1 denoising step, run as a fresh process per N; each process
   reports its own peak RSS (``ru_maxrss``). Flat memory = the 100k peak close to the 10k peak.
2. Throughput (``--throughput``): captions per second for first-step scoring (1 UNet call per
   generation, no decoding) and for full generation (all steps, decode, embed, search), same model,
   same captions, same run; the organism when ``weights/diffmem-organism-v2`` exists, else the tiny model.

    .venv/bin/python benchmarks/bench_scan.py --rss 10000 100000 --throughput
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from diffmem.data import ImageFolderWriter
from diffmem.guard.auto import load_guarded
from diffmem.modelio import default_model
from diffmem.scan.runner import ScanConfig, run_scan
from diffmem.tiny import TinySDConfig, build_tiny_pipeline

WORDS = "red green blue small large old new wooden metal glass cat dog house tree car boat river city".split()


def tiniest_model(folder: Path) -> Path:
    """The smallest tiny-SD config that still has every component (4x4 latents, 8/16 channels)."""

    if not (folder / "model_index.json").is_file():
        cfg = TinySDConfig(
            unet_channels=(8, 16),
            attention_head_dim=8,
            text_hidden=16,
            text_layers=1,
            text_heads=2,
            vae_channels=(8, 16),
            sample_size=8,
        )
        build_tiny_pipeline(cfg, seed=0).save_pretrained(folder)
    return folder


def caption_table(path: Path, n: int) -> Path:
    """``n`` distinct captions (id, caption), written as CSV."""
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        f.write("id,caption\n")
        for i in range(n):
            f.write(f"item{i:07d},a photo of a {' '.join(rng.choices(WORDS, k=5))} number {i}\n")
    return path


def rss_child(args) -> None:
    """Run one scores-only scan in this process and print its peak RSS and time as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    cfg = ScanConfig(
        data=args.data,
        out=args.out,
        model=args.model,
        generate="none",
        num_gens=1,
        steps=1,
        shard_size=2048,
        batch_size=256,
        report=False,
        progress=False,
    )
    summary = run_scan(cfg)
    elapsed = time.perf_counter() - t
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"captions": summary["captions_scored"], "seconds": elapsed, "peak_rss_mib": peak_mib}))


def run_rss(sizes: list[int], work: Path, threads: int) -> list[dict]:
    model = tiniest_model(work / "tiniest")
    out = []
    for n in sizes:
        data = caption_table(work / f"captions_{n}.csv", n)
        cmd = [
            sys.executable, __file__, "--child", "--data", str(data), "--out", str(work / f"scan_{n}"),
            "--model", str(model), "--threads", str(threads),
        ]  # fmt: skip
        res = subprocess.run(
            cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)}
        )
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-3000:])
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row["captions_per_s"] = row["captions"] / row["seconds"]
        print(f"{n:>7} captions: peak RSS {row['peak_rss_mib']:.0f} MiB, {row['seconds']:.0f} s", flush=True)
        out.append(row)
    return out


def run_throughput(work: Path, n_captions: int, threads: int) -> dict:
    """First-step scoring vs full generation + search, same model and captions, captions per second."""
    import torch

    torch.set_num_threads(threads)
    model = default_model()
    steps = 25
    if model is None:
        model = str(work / "tiny")
        if not (Path(model) / "model_index.json").is_file():
            build_tiny_pipeline(seed=0).save_pretrained(model)
    pipe = load_guarded(model)
    pipe.set_progress_bar_config(disable=True)
    from PIL import Image

    data = work / "throughput_data"
    if not (data / "metadata.jsonl").is_file():
        import numpy as np

        rng = np.random.default_rng(0)
        with ImageFolderWriter(data) as w:
            for i in range(n_captions):
                arr = np.asarray(
                    Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64))
                )
                w.add(f"t{i}", f"a photo of thing number {i}", arr)
    result = {"model": model, "steps": steps, "num_gens": 4, "captions": n_captions, "threads": threads}
    for mode in ("none", "all"):
        out = work / f"throughput_{mode}"
        cfg = ScanConfig(
            data=str(data),
            out=str(out),
            model=model,
            generate=mode,
            num_gens=4,
            steps=steps,
            shard_size=16,
            batch_size=8,
            report=False,
            progress=False,
        )
        run_scan(cfg, pipe=pipe)
        timings = json.loads((out / "timings.json").read_text())
        key = "score_s" if mode == "none" else "generate_s"
        result[f"{mode}_timings"] = timings
        result["first_step_captions_per_s" if mode == "none" else "full_generation_captions_per_s"] = (
            n_captions / timings[key]
        )
    result["full_over_first_step_time"] = (
        result["first_step_captions_per_s"] / result["full_generation_captions_per_s"]
    )
    print(json.dumps(result, indent=1))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rss", type=int, nargs="*", default=[], help="dataset sizes for the memory benchmark")
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--throughput-captions", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default="benchmarks/results/bench_scan.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        rss_child(args)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="diffmem-bench-scan-"))
    work.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
    }
    if args.rss:
        report["rss"] = run_rss(args.rss, work, args.threads)
    if args.throughput:
        report["throughput"] = run_throughput(work, args.throughput_captions, args.threads)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
    Path(args.json).write_text(json.dumps({**old, **report}, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
