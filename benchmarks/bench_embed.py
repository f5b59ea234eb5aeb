"""``diffmem embed`` throughput on CPU: images/s with the pixel descriptor and an SSCD-architecture
embedder (ResNet-50 with SSCD's 512-d head, random weights, exported to ONNX; SSCD's own weights are
not installable here, and the cost does not depend on the weights), 1 process (2 threads) vs 2
processes under ``accelerate launch`` (1 thread each). Same images, same run; the two layouts are
checked to be identical.

    .venv/bin/python benchmarks/bench_embed.py --images 2000 --sscd-images 192
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from diffmem.data import ImageFolderWriter
from diffmem.scan.layout import EmbeddingLayout

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` PNG images (smooth random colour fields, ``size`` px) with captions, as an image folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with ImageFolderWriter(folder) as w:
        for i in range(n):
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            w.add(
                f"img{i:06d}",
                f"image {i}",
                np.asarray(Image.fromarray(small).resize((size, size), Image.BICUBIC)),
            )


def export_sscd_like(path: Path) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, 512)
    torch.onnx.export(
        model.eval(), (torch.zeros(1, 3, 288, 288),), str(path), dynamo=False, input_names=["image"],
        output_names=["embedding"], dynamic_axes={"image": {0: "batch", 2: "h", 3: "w"}, "embedding": {0: "batch"}},
    )  # fmt: skip


def run_embed(data: Path, out: Path, embedder_args: list[str], processes: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    args = [
        "embed",
        "--data",
        str(data),
        "--out",
        str(out),
        "--shard-size",
        "32",
        "--no-progress",
        *embedder_args,
    ]
    if processes == 1:
        cmd, threads = [sys.executable, "-m", "diffmem", *args], "2"
    else:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmem", *args]  # fmt: skip
        threads = "1"
    t = time.perf_counter()
    result = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True
    )
    wall = time.perf_counter() - t
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    summary = json.loads((out / "embed_summary.json").read_text())
    return {"processes": processes, "threads_each": int(threads), "images": summary["images_this_run"],
            "embed_s": summary["embed_seconds"], "images_per_s": summary["images_per_s"], "wall_s": wall}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000, help="images for the pixel descriptor")
    p.add_argument("--sscd-images", type=int, default=192, help="images for the SSCD-architecture embedder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_embed"))
    p.add_argument("--json", default=str(HERE / "results" / "bench_embed.json"))
    a = p.parse_args()

    from machine import cpu_model

    a.work.mkdir(parents=True, exist_ok=True)
    data, sscd_data, onnx = a.work / "data", a.work / "data_sscd", a.work / "sscd_like.onnx"
    if not (data / "metadata.jsonl").is_file():
        make_images(data, a.images, a.size)
    if not (sscd_data / "metadata.jsonl").is_file():
        make_images(sscd_data, a.sscd_images, a.size, seed=1)
    if not onnx.is_file():
        export_sscd_like(onnx)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": f"{cpu_model()}, {os.cpu_count()} cores", "image_size": a.size, "runs": []}  # fmt: skip
    cases = [
        ("pixel32", data, ["--embedder", "pixel", "--pixel-size", "32"]),
        (
            "sscd-arch ResNet-50 onnx, small_288",
            sscd_data,
            ["--embedder", "sscd", "--embedder-file", str(onnx)],
        ),
    ]
    for name, folder, emb_args in cases:
        outs = {}
        for procs in (1, 2):
            outs[procs] = a.work / f"out_{name.split()[0]}_{procs}"
            run = {"embedder": name, **run_embed(folder, outs[procs], emb_args, procs)}
            print(run, flush=True)
            result["runs"].append(run)
        one, two = EmbeddingLayout(outs[1]), EmbeddingLayout(outs[2])
        same = bool(np.array_equal(one.all_vectors(), two.all_vectors()))
        result["runs"][-1]["same_layout_as_1_process"] = same
        result["runs"][-1]["speedup_vs_1_process"] = round(
            result["runs"][-1]["images_per_s"] / result["runs"][-2]["images_per_s"], 3
        )
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
