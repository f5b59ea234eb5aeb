"""Flows shared by the benchmark scripts and the real-size test: timing (paired pipeline comparisons,
first-step throughput), one small run of every command at real size, and memory measurement.

Times are wall-clock (``time.perf_counter``) and process CPU time; on CUDA the device is synchronized
before each clock read, so a time covers the GPU work it started. Comparisons interleave the two
pipelines in ABBA order and report medians and the median of the paired ratios, which is robust to
the machine's drift during a run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.attack.dori import denoising_loss, gradient_checkpointing
from diffmem.data import ImageFolderWriter
from diffmem.detect import score_prompts
from diffmem.hooks.neurons import scaled_value_neurons, value_layers
from diffmem.solidmark.keying import key_dataset
from diffmem.train.adversarial import add_lora
from diffmem.train.optimizers import make_optimizer

__all__ = [
    "compare_pipelines",
    "first_step_throughput",
    "interleaved",
    "peak_memory",
    "real_size_commands",
    "real_size_inputs",
    "timed",
    "unet_workloads",
]


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


def interleaved(
    runs: Mapping[str, Callable[[], Any]], repeats: int, abba: bool = False
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """``({name: [wall seconds per round]}, {name: its last result})`` of every run in ``runs`` over
    ``repeats`` rounds, the runs interleaved within each round (in ``runs``' order, reversed every other
    round with ``abba``), so the machine's drift hits all alike. Each time is :func:`timed`'s."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, Any] = {}
    for r in range(repeats):
        order = list(runs)[::-1] if abba and r % 2 else list(runs)
        for name in order:
            wall, _, results[name] = timed(runs[name])
            times[name].append(wall)
    return times, results


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
    # threshold 0 without the early exit: random weights memorize nothing, so this forces the search over
    # every candidate neuron until the budget ends it
    "localize": "localize --model {model} --prompts {d}/prompts.txt --limit 1 --reference-prompts {d}/reference.txt "
    "--threshold 0 --no-early-exit --seeds 4 --steps 4 --max-unet-calls 8 --out {o}/localize",
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


# ------------------------------------------------------------------------------------------ memory
def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), so it does not hide the next peak."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, float]:
    """Memory ``fn()`` needs beyond what is already held: ``{"before_mib", "peak_mib", "extra_mib", "wall_s"}``.

    CUDA: the allocator's peak (``torch.cuda.max_memory_allocated``, reset first). CPU (Linux): the
    process's resident high-water mark, reset through ``/proc/self/clear_refs`` before ``fn`` runs, so
    the weights already loaded count in ``before`` and not in ``extra``.
    """
    import gc

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
        wall, _, _ = timed(fn)
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        _release_free_heap()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _status_mib("VmRSS")
        wall, _, _ = timed(fn)
        peak = _status_mib("VmHWM")
    return {"before_mib": before, "peak_mib": peak, "extra_mib": peak - before, "wall_s": wall}


def unet_workloads(pipe, px: int) -> dict[str, Callable[[], Any]]:
    """One step of each kind of UNet work diffmem does, at ``px`` px, each a callable for :func:`peak_memory`.

    ``generate``: one guided denoising step of one image (UNet batch 2: detect, scan, prune, SolidMark);
    ``detect-batch-8``: first-step scores of 8 prompts (UNet batch 16); ``nemo-masks-8``: 8 candidate
    masks x 10 seeds in one call (NeMo's batched search on CUDA, UNet batch 80); ``attack``: one Dori
    step (forward and backward to the text embedding, batch 8), ``attack-checkpointed`` the same with
    gradient checkpointing; ``lora-step``: one LoRA training step (rank 4, batch 4, AdamW);
    ``full-step-adamw`` / ``full-step-adamw8bit``: one full fine-tuning step (batch 4, gradient
    checkpointing on) with AdamW or bitsandbytes' 8-bit AdamW (where installed). The training steps
    change the UNet's weights: use a model loaded for the benchmark.
    """

    unet, device = pipe.unet, pipe._execution_device
    dtype = unet.dtype
    h = w = px // pipe.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)

    def generate():
        pipe("a photo", num_inference_steps=1, height=px, width=px, output_type="latent")

    def detect():
        score_prompts(
            pipe,
            [f"prompt {i}" for i in range(8)],
            num_gens=1,
            num_inference_steps=50,
            height=px,
            width=px,
            batch_size=8,
            progress=False,
        )

    def nemo_masks():
        layers = value_layers(unet)
        scales = {n: torch.ones(8, m.out_features, device=device, dtype=dtype) for n, m in layers.items()}
        x = torch.randn(80, unet.config.in_channels, h, w, generator=g).to(device, dtype)
        with torch.no_grad(), scaled_value_neurons(unet, layers, scales):
            return unet(x, t, encoder_hidden_states=embeds.expand(80, -1, -1)).sample

    def attack(checkpointed: bool):
        latents = torch.randn(1, unet.config.in_channels, h, w, generator=g).to(device)
        noise = torch.randn(8, unet.config.in_channels, h, w, generator=g).to(device)
        y = embeds.float().clone().requires_grad_(True)
        unet.requires_grad_(False)
        with gradient_checkpointing(unet, checkpointed):
            denoising_loss(unet, pipe.scheduler, latents, y, noise, t.expand(8)).backward()

    def lora_step():

        params = add_lora(unet, 4, ("to_q", "to_k", "to_v", "to_out.0"), 0)
        try:
            opt = torch.optim.AdamW(params, lr=1e-4)
            latents = torch.randn(4, unet.config.in_channels, h, w, generator=g).to(device)
            noise = torch.randn(4, unet.config.in_channels, h, w, generator=g).to(device)
            denoising_loss(unet, pipe.scheduler, latents, embeds, noise, t.expand(4)).backward()
            opt.step()
        finally:
            unet.unload_lora()  # the plain modules back (value_layers and hooks expect nn.Linear)
            unet.requires_grad_(False)

    def full_step(optimizer: str):

        unet.requires_grad_(True)
        try:
            opt = make_optimizer(unet.parameters(), optimizer, lr=1e-6)
            latents = torch.randn(4, unet.config.in_channels, h, w, generator=g).to(device)
            noise = torch.randn(4, unet.config.in_channels, h, w, generator=g).to(device)
            with gradient_checkpointing(unet):
                denoising_loss(unet, pipe.scheduler, latents, embeds, noise, t.expand(4)).backward()
            opt.step()
        finally:
            unet.requires_grad_(False)
            for p in unet.parameters():
                p.grad = None

    workloads = {
        "generate": generate,
        "detect-batch-8": detect,
        "nemo-masks-8": nemo_masks,
        "attack": lambda: attack(False),
        "attack-checkpointed": lambda: attack(True),
        "lora-step": lora_step,
        "full-step-adamw": lambda: full_step("adamw"),
    }
    try:
        import bitsandbytes  # noqa: F401

        workloads["full-step-adamw8bit"] = lambda: full_step("adamw8bit")
    except ImportError:
        pass
    return workloads
