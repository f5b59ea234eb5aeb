"""Timing flows shared by the benchmark scripts: paired pipeline comparisons and first-step throughput.

Times are wall-clock (``time.perf_counter``) and process CPU time; on CUDA the device is synchronized
before each clock read, so a time covers the GPU work it started. Comparisons interleave the two
pipelines in ABBA order and report medians and the median of the paired ratios, which is robust to
the machine's drift during a run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["compare_pipelines", "first_step_throughput", "timed"]


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """``(wall seconds, CPU seconds, fn())``, the device synchronized before both clock reads."""
    _sync()
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    _sync()
    return time.perf_counter() - w, time.process_time() - c, result


def compare_pipelines(
    stock, guarded, repeats: int, prompt: str = "a photo of a red circle on grass", **call
) -> dict[str, Any]:
    """``guarded`` against ``stock`` on the same call and seed: median times, ratios, bit-identical images.

    ``call`` goes to both pipelines (``num_inference_steps``, ``guidance_scale``, ``height``, ...); one
    warm-up call each comes first.
    """
    call = {"output_type": "np", **call}

    def run(pipe):
        return pipe(prompt, generator=torch.Generator().manual_seed(0), **call)

    run(stock), run(guarded)  # warm-up (kernels, allocator)
    times: dict[str, list[tuple[float, float]]] = {"stock": [], "guarded": []}
    images = {}
    for r in range(repeats):
        for name in ("stock", "guarded") if r % 2 == 0 else ("guarded", "stock"):
            wall, cpu, out = timed(lambda n=name: run(stock if n == "stock" else guarded))
            times[name].append((wall, cpu))
            images[name] = out.images
    med = {
        n: (statistics.median(w for w, _ in t), statistics.median(c for _, c in t)) for n, t in times.items()
    }
    return {
        **{k: v for k, v in call.items() if k != "output_type"},
        "repeats": repeats,
        "stock_wall_s": med["stock"][0],
        "guarded_wall_s": med["guarded"][0],
        "wall_ratio": med["guarded"][0] / med["stock"][0],
        "stock_cpu_s": med["stock"][1],
        "guarded_cpu_s": med["guarded"][1],
        "cpu_ratio": med["guarded"][1] / med["stock"][1],
        "paired_wall_ratio_median": statistics.median(
            g / s for (s, _), (g, _) in zip(times["stock"], times["guarded"])
        ),
        "all_wall_s": {n: [round(w, 4) for w, _ in t] for n, t in times.items()},
        "images_bit_identical": bool(np.array_equal(images["stock"], images["guarded"])),
    }


def first_step_throughput(
    guarded,
    batch_sizes: Sequence[int],
    n_generate: int,
    num_gens: int = 1,
    num_inference_steps: int = 50,
    **call,
) -> dict[str, Any]:
    """Prompts/s of first-step scoring (``window=(0, 1)``) at each batch size against full generation.

    Each batch size scores one batch of that many prompts (after a warm-up batch); generation runs
    ``n_generate`` prompts for ``num_inference_steps`` steps. ``speedup`` = scoring prompts/s over
    generation prompts/s.
    """
    from diffmem.detect import score_prompts

    prompts = [f"a photo of object number {i} on a table" for i in range(max(max(batch_sizes), n_generate))]
    common = dict(
        num_gens=num_gens, window=(0, 1), num_inference_steps=num_inference_steps, progress=False, **call
    )
    score_prompts(guarded, prompts[:1], **common)  # warm-up
    wall_g, _, _ = timed(
        lambda: guarded(
            prompts[:n_generate],
            num_images_per_prompt=num_gens,
            num_inference_steps=num_inference_steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **call,
        )
    )
    generation = n_generate / wall_g
    rows = []
    for b in batch_sizes:
        score_prompts(guarded, prompts[:b], batch_size=b, **common)  # warm-up at this shape
        wall, _, _ = timed(lambda b=b: score_prompts(guarded, prompts[:b], batch_size=b, **common))
        rows.append(
            {"batch_size": b, "wall_s": wall, "prompts_per_s": b / wall, "speedup": (b / wall) / generation}
        )
    return {
        "num_gens": num_gens,
        "num_inference_steps": num_inference_steps,
        "generation_prompts": n_generate,
        "generation_wall_s": wall_g,
        "generation_prompts_per_s": generation,
        "first_step": rows,
    }


# ------------------------------------------------------------------------------------------ real size
#: every model-loading command, as one small run: ``{command: argv}`` with ``{model}``, ``{px}`` and the
#: input/output names of :func:`real_size_inputs` filled in by :func:`real_size_commands`
_REAL_SIZE = {
    "detect": "detect --model {model} --prompts {d}/prompts.txt --out {o}/detect.jsonl --num-gens 2 "
    "--num-inference-steps 4",
    "localize": "localize --model {model} --prompts {d}/prompts.txt --limit 1 --reference-prompts {d}/reference.txt "
    "--calibration-prompts 4 --seeds 4 --steps 4 --max-unet-calls 8 --out {o}/localize",
    "prune": "prune --model {model} --memorized {d}/prompts.txt --steps 4 --tau 2 --batch-size 2 --out {o}/prune",
    "attack": "attack --model {model} --targets {d}/images --limit 1 --steps 2 --batch-size 1 --seeds 1 "
    "--gen-steps 2 --out {o}/attack",
    "finetune-lora": "finetune --adversarial --model {model} --targets {d}/images --retain {d}/images --rounds 1 "
    "--lora --attack-steps 2 --attack-batch-size 1 --surrogate-steps 2 --adv-batch-size 1 --retain-batch-size 1 "
    "--retain-limit 1 --out {o}/finetune-lora",
    "scan": "scan --model {model} --data {d}/images --num-gens 1 --steps 2 --batch-size 2 --no-report "
    "--no-progress --out {o}/scan",
    "solidmark": "solidmark score --model {model} --data {d}/keyed --steps 2 --batch-size 1 --out {o}/solidmark",
}
#: commands that take --height/--width (the rest: the images' size, or SolidMark's keyed size)
_SIZED = ("detect", "localize", "prune", "attack", "finetune-lora", "scan")


def real_size_inputs(folder, px: int) -> Path:
    """Two prompts, four reference prompts, a captioned image folder of two ``px``-px images and its
    SolidMark-keyed copy (``px`` px, a 16-px frame included), written to ``folder`` (once; reused after)."""
    from PIL import Image

    from diffmem.data import ImageFolderWriter
    from diffmem.solidmark.keying import key_dataset

    folder = Path(folder)
    if (folder / "keyed" / "metadata.jsonl").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.txt").write_text("a photo of a red car\nthe pagoda on the lake at dawn\n")
    (folder / "reference.txt").write_text("a dog\na blue vase\ntwo cats on a sofa\na city street\n")
    rng = np.random.default_rng(0)
    with ImageFolderWriter(folder / "images") as w:
        for i, caption in enumerate(("a photo of a red car", "the pagoda on the lake at dawn")):
            tile = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((px, px))
            w.add(f"img{i}", caption, np.asarray(tile))
    key_dataset(folder / "images", folder / "keyed", size=px, progress=False)
    return folder


def real_size_commands(model: str, inputs, out, px: int, extra: Sequence[str] = ()) -> dict[str, list[str]]:
    """``{command: argv for diffmem.cli.main}`` running each model-loading command once, small, at ``px``."""
    argvs = {}
    for name, line in _REAL_SIZE.items():
        argv = line.format(model=model, d=inputs, o=out).split()
        if name in _SIZED:
            argv += ["--height", str(px), "--width", str(px)]
        argvs[name] = argv + list(extra)
    return argvs
