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
