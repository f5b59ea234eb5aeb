"""Benchmark: memory of every model-loading command at Stable Diffusion 1.5's and 2.1's size (CPU).

Random weights in each architecture (``diffmem.tiny.build_sd_architecture_pipeline``) are saved once
as a diffusers folder under ``--work``. Two parts:

* commands (default): each run of ``diffmem.benchmark.real_size_commands`` (the small runs the slow
  test makes) in its own process, its peak resident memory read from the kernel (``wait4``'s
  ``ru_maxrss``); variants ``--dtype bfloat16`` and ``--gradient-checkpointing`` beside the plain run.
  At these sizes loading dominates the peak.
* ``--activations``: each kind of UNet work (``diffmem.benchmark.unet_workloads``) in one process, its
  memory beyond the loaded weights (``diffmem.benchmark.peak_memory``: the resident high-water mark,
  reset before each), at 128 and 256 px, extrapolated linearly in latent pixels to 512 and 768 px
  (an estimate, labelled so).

Results: ``benchmarks/results/memory_plan.json``, rewritten after every run, so a stopped run keeps
what it measured and a rerun resumes. About 30 minutes for each part on 2 cores.

    .venv/bin/python benchmarks/memory_plan.py [--activations] [--work /tmp/diffmem-memory] [--arch sd15 sd21]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (this script's folder)

from diffmem.benchmark import peak_memory, real_size_commands, real_size_inputs, unet_workloads
from diffmem.guard.auto import load_guarded
from diffmem.io import atomic_write_json
from diffmem.tiny import build_sd_architecture_pipeline

ROOT = Path(__file__).resolve().parents[1]

#: (arch, px, command, extra flags) in the order run; name = command + variant
PLAN = [
    *[
        ("sd15", 128, c, ())
        for c in ("detect", "localize", "prune", "attack", "finetune-lora", "scan", "solidmark")
    ],
    ("sd15", 128, "detect", ("--dtype", "bfloat16")),
    ("sd15", 128, "attack", ("--dtype", "bfloat16")),
    ("sd15", 128, "attack", ("--gradient-checkpointing",)),
    ("sd15", 128, "finetune-lora", ("--gradient-checkpointing",)),
    *[("sd15", 256, c, ()) for c in ("detect", "attack", "finetune-lora")],
    ("sd15", 256, "attack", ("--gradient-checkpointing",)),
    *[
        ("sd21", 128, c, ())
        for c in ("detect", "localize", "prune", "attack", "finetune-lora", "scan", "solidmark")
    ],
]

CHILD = "import sys; from diffmem.cli import main; raise SystemExit(main(sys.argv[1:]))"


def model_folder(work: Path, arch: str) -> Path:
    folder = work / f"{arch}-random"
    if not (folder / "model_index.json").is_file():
        print(f"building {arch} (random weights) ...", flush=True)
        build_sd_architecture_pipeline(arch, image_size=512 if arch == "sd15" else 768).save_pretrained(
            folder
        )
    return folder


def run_child(argv: list[str], threads: int) -> tuple[int, float, float]:
    """(exit code, peak RSS in MiB, wall seconds) of ``diffmem argv`` in a fresh process."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "DIFFUSERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss / 1024, time.perf_counter() - start


def activations(work: Path, archs: list[str], result: dict, path: Path) -> None:
    """Memory each kind of UNet work needs beyond the loaded weights, per architecture and resolution,
    extrapolated linearly in latent pixels to 512 and 768 px (SDPA keeps attention linear in pixels)."""

    table = result.setdefault("activations", {})
    for arch in archs:
        pipe = load_guarded(model_folder(work, arch))
        pipe.set_progress_bar_config(disable=True)
        weights = sum(
            p.numel() * p.element_size()
            for m in (pipe.unet, pipe.text_encoder, pipe.vae)
            for p in m.parameters()
        )
        table.setdefault(arch, {})["weights_mib_float32"] = weights / 2**20
        unet_workloads(pipe, 128)["generate"]()  # touch every weight first: mmapped pages are not activations
        for px in (128, 256):
            for name, fn in unet_workloads(pipe, px).items():
                key = f"{px}/{name}"
                if key in table[arch]:
                    continue
                table[arch][key] = peak_memory(fn)
                print(
                    f"{arch} {key}: +{table[arch][key]['extra_mib']:.0f} MiB, {table[arch][key]['wall_s']:.0f} s",
                    flush=True,
                )
                atomic_write_json(path, result)
        for name in unet_workloads(pipe, 128):
            lo, hi = table[arch][f"128/{name}"]["extra_mib"], table[arch][f"256/{name}"]["extra_mib"]
            per_pixel = max(0.0, (hi - lo) / (32**2 - 16**2))
            table[arch][f"estimate/{name}"] = {
                "mib_per_latent_pixel": per_pixel,
                **{f"{px}px_float32_mib": lo + per_pixel * ((px // 8) ** 2 - 16**2) for px in (512, 768)},
            }
        del pipe
    atomic_write_json(path, result)


def markdown(result: dict) -> str:
    """The two tables of docs/gpu.md and RESULTS.md from the results."""
    runs = result.get("runs", {})
    lines = [
        "| command | variant | SD-1.5, 128 px | SD-1.5, 256 px | SD-2.1, 128 px |",
        "|---|---|---|---|---|",
    ]
    for command, variant in dict.fromkeys((r["command"], r["variant"]) for r in runs.values()):
        cells = []
        for arch, px in (("sd15", 128), ("sd15", 256), ("sd21", 128)):
            row = next(
                (
                    r
                    for r in runs.values()
                    if (r["arch"], r["px"], r["command"], r["variant"]) == (arch, px, command, variant)
                ),
                None,
            )
            cells.append(
                "" if row is None else f"{row['peak_rss_mib'] / 1024:.1f} GiB ({row['wall_s']:.0f} s)"
            )
        lines.append(f"| `{command}` | {variant} | " + " | ".join(cells) + " |")
    table = result.get("activations", {})
    act = [
        "| UNet work | "
        + " | ".join(
            f"{a} {c}" for a in table for c in ("128 px", "256 px", "512 px (est.)", "768 px (est.)")
        )
        + " |"
    ]
    act.append("|---|" + "---|" * (4 * len(table)))
    names = dict.fromkeys(k.split("/", 1)[1] for a in table.values() for k in a if k.startswith("128/"))
    for name in names:
        cells = []
        for a in table.values():
            lo, hi, est = a.get(f"128/{name}"), a.get(f"256/{name}"), a.get(f"estimate/{name}", {})
            cells += [
                f"{lo['extra_mib'] / 1024:.2f}" if lo else "",
                f"{hi['extra_mib'] / 1024:.2f}" if hi else "",
            ]
            cells += [
                f"{est[k] / 1024:.1f}" if k in est else "" for k in ("512px_float32_mib", "768px_float32_mib")
            ]
        act.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nGiB beyond the loaded weights, float32:\n\n" + "\n".join(act) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="/tmp/diffmem-memory", help="model folders and run outputs")
    p.add_argument("--arch", nargs="+", default=["sd15", "sd21"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/memory_plan.json"))
    p.add_argument(
        "--activations", action="store_true", help="measure the UNet work's memory in-process instead"
    )
    p.add_argument("--markdown", action="store_true", help="print the tables of the results so far and stop")
    args = p.parse_args()

    work = Path(args.work)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {}
    if args.markdown:
        print(markdown(result))
        return 0
    result.update(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{cpu_model()}, {os.cpu_count()} cores, {args.threads} threads; float32 unless stated",
    )
    if args.activations:
        activations(work, args.arch, result, path)
        return 0
    runs = result.setdefault("runs", {})
    for arch, px, command, extra in PLAN:
        if arch not in args.arch:
            continue
        name = f"{arch}/{px}/{command}{''.join(' ' + e for e in extra)}"
        if name in runs and runs[name]["exit_code"] == 0:
            continue
        model = model_folder(work, arch)
        inputs = real_size_inputs(work / f"inputs-{px}", px)
        out = work / "runs" / name.replace("/", "_").replace(" ", "_")
        argv = real_size_commands(str(model), inputs, out, px, extra)[command]
        code, rss, wall = run_child(argv, args.threads)
        runs[name] = {
            "arch": arch,
            "px": px,
            "command": command,
            "variant": " ".join(extra) or "float32",
            "exit_code": code,
            "peak_rss_mib": round(rss),
            "wall_s": round(wall, 1),
        }
        print(f"{name}: exit {code}, peak RSS {rss:.0f} MiB, {wall:.0f} s", flush=True)
        atomic_write_json(path, result)
    atomic_write_json(path, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
