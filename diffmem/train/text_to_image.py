"""Text-to-image fine-tuning of a Stable Diffusion 1.x/2.x or SDXL model with a training-time mitigation (``diffmem train``).

The VAE is frozen (latents are the posterior modes, computed once), the text encoder frozen or trained,
the UNet (all of it, chosen transformer blocks, or LoRA adapters) learns the denoising loss of the
mitigation's step (:mod:`diffmem.train.mitigations`; ``none`` is the standard loss)

    L = sum_i w_i || f(z_t,i, t_i, c_i) - target_i ||^2 / #{i : w_i > 0}

over the ``batch_size`` samples of an optimizer step, with AdamW, gradient clipping and any of diffusers'
LR schedules. A step's samples are split over processes (accelerate) and ``gradient_accumulation``
micro-batches; the normalisation is over the whole step, so the weights do not depend on that split.

Every random draw of a sample (its timestep, noise, caption dropout, the mitigation's draws) comes from
``(seed, epoch, row)``, the batch order from ``(seed, epoch)``; checkpoints (every ``checkpoint_every``
steps) hold the trained weights, the optimizer, the LR schedule and the run's statistics (the log and the
steps not yet in a log row), so a run killed at any moment and rerun resumes to exactly the weights, the
log and the totals an uninterrupted run reaches (all but the seconds). The output is a standard diffusers
folder (LoRA adapters merged) with a model card (``README.md``) and ``diffmem_train.json``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffmem.data import check_record, open_dataset
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_write_json, remove_stale_temporaries
from diffmem.modelio import load_pipeline, stock_pipeline_class
from diffmem.records import BadRow
from diffmem.scan.bad_rows import read_bad
from diffmem.seeding import derive_seed, item_generator
from diffmem.train.adapters import DEFAULT_LORA_TARGETS, add_lora, merge_lora, set_trainable_blocks
from diffmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffmem.train.mitigations import TrainingBatch, get_training_mitigation
from diffmem.train.optimizers import make_optimizer

__all__ = [
    "TRAIN_RECORD",
    "TrainConfig",
    "TrainingData",
    "batch_indices",
    "caption_conditioning",
    "load_training_data",
    "train_text_to_image",
]

#: Written into the trained pipeline folder: the recipe, the data and the run (the model card's source).
TRAIN_RECORD = "diffmem_train.json"

#: Steps per row of the run's log (``log.json``; the last row ends at the last step).
LOG_EVERY = 25

#: Settings that may differ when a run is resumed (when it stops, how much memory it takes).
RESUMABLE_CHANGES = ("steps", "gradient_checkpointing", "checkpoint_every")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a fine-tuning run (defaults: diffusers' ``train_text_to_image.py`` where it has one)."""

    steps: int = 1000
    batch_size: int = 16  # samples per optimizer step, over all processes and micro-batches
    gradient_accumulation: int = 1  # micro-batches per step and process
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler name
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    mode: str = "full"  # "full" or "lora"
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    trainable_blocks: tuple[str, ...] | None = None  # UNet transformer blocks that train (None: all)
    mitigation: str = "none"  # a name of diffmem.train.mitigations.TRAINING_MITIGATIONS
    mitigation_options: Mapping[str, object] = field(default_factory=dict)
    mixed_precision: str = "no"  # accelerate's: no, fp16, bf16 (autocast; master weights stay float32)
    checkpoint_every: int = 100
    seed: int = 0
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"  # or "adamw8bit" (diffmem.train.optimizers)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["trainable_blocks"] = None if self.trainable_blocks is None else list(self.trainable_blocks)
        d["mitigation_options"] = dict(self.mitigation_options)
        return d

    def check(self) -> None:
        from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

        for name in ("steps", "batch_size", "gradient_accumulation", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')}: expected at least 1, got {getattr(self, name)}"
                )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(
                f"--caption-dropout: expected a probability in [0, 1), got {self.caption_dropout}"
            )
        if self.mode not in ("full", "lora"):
            raise ValueError(f"--mode: expected full or lora, got {self.mode!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"--mixed-precision: expected no, fp16 or bf16, got {self.mixed_precision!r}")
        names = sorted(t.value for t in TYPE_TO_SCHEDULER_FUNCTION)
        if self.lr_scheduler not in names:
            raise ValueError(f"--lr-scheduler: expected one of {', '.join(names)}, got {self.lr_scheduler!r}")


@dataclass
class TrainingData:
    """A captioned image set in memory: ``pixels`` ``[N, H, W, 3]`` uint8, one caption and row id per image,
    and ``image_ids``: the identity of each row's image (rows that copy one image may share it; ``ambient``
    gives each identity one noisy copy)."""

    pixels: np.ndarray
    captions: list[str]
    row_ids: list[str]
    image_ids: list[str]
    source: str = ""
    bad_rows: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.pixels)
        if not (len(self.captions) == len(self.row_ids) == len(self.image_ids) == n):
            raise ValueError("training data: one caption, row id and image id per image expected")
        if n == 0:
            raise ValueError(f"--data {self.source}: no usable row to train on")

    def __len__(self) -> int:
        return len(self.pixels)

    def subset(self, rows: Sequence[int], source: str) -> TrainingData:
        """The rows ``rows`` (indices) as their own data, named ``source``."""
        rows = list(rows)
        return TrainingData(
            self.pixels[rows],
            [self.captions[i] for i in rows],
            [self.row_ids[i] for i in rows],
            [self.image_ids[i] for i in rows],
            source,
        )

    def describe(self) -> dict:
        return {
            "data": self.source,
            "rows": len(self),
            "distinct_images": len(set(self.image_ids)),
            "bad_rows": len(self.bad_rows),
            "resolution": list(self.pixels.shape[1:3]),
        }


def merge_stats(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Combine a mitigation's log numbers over micro-batches, steps or a whole run: counts add up, a
    ``*_mean`` is averaged over the parts that have it, a ``*_max`` is their maximum."""
    merged: dict[str, float] = {}
    for key in dict.fromkeys(k for part in parts for k in part):
        values = [float(part[key]) for part in parts if key in part]
        if key.endswith("_max"):
            merged[key] = max(values)
        elif key.endswith("_mean"):
            merged[key] = sum(values) / len(values)
        else:
            merged[key] = sum(values)
    return merged


def _resize_center_crop(image, size: int) -> np.ndarray:
    """Shorter side to ``size`` (bicubic), then the central ``size x size`` crop (diffusers' training transform)."""
    from PIL import Image

    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_training_data(
    path: str | os.PathLike,
    resolution: int,
    *,
    id_column: str | None = None,
    caption_column: str | None = None,
    image_column: str | None = None,
    group_column: str | None = None,
    convert_modes: bool = False,
) -> TrainingData:
    """Read a captioned dataset (every format ``diffmem scan`` reads) at ``resolution`` px; unreadable rows are
    set aside with their reason. ``group_column`` (default: ``image_id`` when the data has it) names rows
    that copy one image."""

    pixels, captions, row_ids, image_ids, bad = [], [], [], [], []
    group = group_column
    for item in open_dataset(
        path, id_column=id_column, caption_column=caption_column, image_column=image_column
    ):
        if isinstance(item, BadRow):
            bad.append(read_bad(item))
            continue
        image, problem = check_record(item, convert_modes=convert_modes)
        if problem is not None:
            bad.append(read_bad(problem))
            continue
        if group is None and "image_id" in item.extra:
            group = "image_id"
        if group is not None and group not in item.extra:
            raise ValueError(f"--group-column: {path} row {item.row} has no column {group!r}")
        pixels.append(_resize_center_crop(image, resolution))
        captions.append(item.caption)
        row_ids.append(item.id)
        image_ids.append(str(item.extra[group]) if group is not None else item.id)
    stack = np.stack(pixels) if pixels else np.zeros((0, resolution, resolution, 3), np.uint8)
    return TrainingData(stack, captions, row_ids, image_ids, str(path), bad)


def batch_indices(
    n: int, batch: int, step: int, seed: int, scope: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``step``'s batch and the epoch of each: consecutive slices of per-epoch permutations (from
    ``(seed, scope, epoch)``), so the row order does not depend on the batch size. The organism's training
    draws its batches here too, one ``scope`` per phase."""
    start, rows, epochs = step * batch, [], []
    while len(rows) < batch:
        epoch, offset = divmod(start + len(rows), n)
        perm = torch.randperm(n, generator=item_generator(seed, scope, "epoch", epoch))
        take = perm[offset : offset + batch - len(rows)].tolist()
        rows.extend(take)
        epochs.extend([epoch] * len(take))
    return torch.tensor(rows), torch.tensor(epochs)


def _check_workdir(workdir: Path, record: dict) -> None:
    """Refuse to resume a run made with other settings; write the run's record."""
    path = workdir / "config.json"
    if path.is_file() and latest_checkpoint(workdir / "checkpoints") is not None:
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in record if k != "config" and old.get(k) != record[k]]
        changed += [
            f"--{k.replace('_', '-')}"
            for k, v in record["config"].items()
            if k not in RESUMABLE_CHANGES and old.get("config", {}).get(k) != v
        ]
        if changed:
            raise ValueError(
                f"--out: {workdir} holds a run with other settings ({', '.join(changed)}); use another --out "
                f"(only {', '.join('--' + k.replace('_', '-') for k in RESUMABLE_CHANGES)} may change when resuming)"
            )
    atomic_write_json(path, record)


def _has_accelerator() -> bool:
    """A CUDA / MPS / XPU device is there (``torch.accelerator`` from torch 2.6; the CUDA and MPS checks before)."""
    if hasattr(torch, "accelerator"):
        return bool(torch.accelerator.is_available())
    return torch.cuda.is_available() or torch.backends.mps.is_available()


def _machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def _save_pipeline(pipe, out: Path, files: Mapping[str, str]) -> Path:
    """``save_pretrained`` to a temporary folder, write ``files`` (name -> text) beside it, rename into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def model_card(record: dict) -> str:
    """A diffusers-style model card (YAML header + Markdown) from the run's record."""
    cfg, data, run = record["config"], record["data"], record["run"]
    trained = "LoRA adapters (merged)" if cfg["mode"] == "lora" else "the UNet's weights"
    if cfg["trainable_blocks"] is not None:
        trained += f" of {len(cfg['trainable_blocks'])} transformer blocks: " + ", ".join(
            f"`{b}`" for b in cfg["trainable_blocks"]
        )
    mitigation = record["mitigation"]
    options = ", ".join(f"{k}={v}" for k, v in mitigation.items() if k != "name") or "defaults"
    rows = "\n".join(
        f"| {k} | `{json.dumps(v)}` |"
        for k, v in cfg.items()
        if k not in ("mitigation", "mitigation_options")
    )

    def loss_text(value) -> str:
        return "(every sample left out)" if value is None else f"{value:.4f}"

    losses = "\n".join(f"| {r['step']} | {loss_text(r['loss'])} | {r['seconds']} |" for r in run["log"][-8:])
    return f"""---
library_name: diffusers
tags: [text-to-image, stable-diffusion, diffmem, fine-tuned]
base_model: {record["model"]}
---

# Fine-tuned with `diffmem train`

Base model `{record["model"]}` (UNet fingerprint `{record["base_fingerprint"]}`), fine-tuned on
`{data["data"]}`: {data["rows"]} rows, {data["distinct_images"]} distinct images, {data["bad_rows"]} rows set
aside, at {data["resolution"][0]} x {data["resolution"][1]} px. Trained: {trained}; text encoder
{"trained" if cfg["train_text_encoder"] else "frozen"}; VAE frozen.

**Training-time mitigation: `{mitigation["name"]}`** ({options}).

{run["steps"]} steps of {cfg["batch_size"]} samples ({run["trainable_parameters"]:,} trainable parameters,
{run["processes"]} process(es)), {run["seconds"]:.0f} s on {run["machine"]}; final loss
{loss_text(run["final_loss"])}.

| setting | value |
|---|---|
{rows}

| step | loss | seconds |
|---|---|---|
{losses}

Load it with `{run.get("pipeline", "StableDiffusionPipeline")}.from_pretrained(folder)`; the full record is `{TRAIN_RECORD}`.
"""


def encode_latents(vae, pixels: np.ndarray, device, batch: int = 32) -> torch.Tensor:
    """``(mode(q(z | x)) - shift) * scaling_factor`` of uint8 ``[N, H, W, 3]`` images, float32 on the CPU."""
    was = next(vae.parameters()).device
    vae.to(device).requires_grad_(False)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    chunks = []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = torch.from_numpy(pixels[i : i + batch]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            chunks.append(vae.encode(x.to(device, vae.dtype)).latent_dist.mode().float().cpu())
    vae.to(was)  # back where it was (a trainer's VAE: off the accelerator while the UNet trains)
    return (torch.cat(chunks) - shift) * vae.config.scaling_factor


def encode_captions(
    tokenizer, text_encoder, captions: Sequence[str], device, grad: bool = False
) -> torch.Tensor:
    """The text encoder's last hidden states of ``captions``, padded to the tokenizer's maximum length."""
    ids = tokenizer(
        list(captions),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    with contextlib.nullcontext() if grad else torch.no_grad():
        return text_encoder(ids)[0]


def caption_conditioning(
    pipe, captions: Sequence[str], device, size: tuple[int, int], grad: bool = False
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """What ``pipe``'s UNet is conditioned on for ``captions``: ``(encoder_hidden_states, added_cond_kwargs)``.

    SD 1.x/2.x: :func:`encode_captions`, and ``None``. SDXL: the pipeline's own ``encode_prompt`` (both text
    encoders' penultimate states, concatenated; the second's pooled projection as ``text_embeds``) and
    ``time_ids = (h, w, 0, 0, h, w)`` at ``size`` (original size = target size, no crop: the training images
    are resized and centre-cropped to ``size`` when read)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return encode_captions(pipe.tokenizer, pipe.text_encoder, captions, device, grad=grad), None
    with contextlib.nullcontext() if grad else torch.no_grad():
        cond, _, pooled, _ = pipe.encode_prompt(
            list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
    h, w = size
    time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=cond.device)
    return cond, {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), 6)}


def train_text_to_image(
    model: str | os.PathLike | None,
    data: TrainingData,
    workdir: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    until_step: int | None = None,
    pipe=None,
    provenance: Mapping[str, object] | None = None,
    on_log: Callable[[dict], None] | None = None,
) -> Path:
    """Fine-tune (or resume fine-tuning) ``model`` on ``data``; save the pipeline to ``out`` (default
    ``workdir/model``) and return that folder.

    ``until_step`` stops after that step (checkpointed, as an interruption would) and returns the checkpoint
    folder; rerun without it to continue. ``pipe`` is an already loaded pipeline of ``model`` (its modules
    are trained in place). ``provenance`` is recorded with the run (and must match on resume); ``on_log``
    gets every log row.
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config = config or TrainConfig()
    config.check()
    mitigation = get_training_mitigation(config.mitigation, dict(config.mitigation_options))
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else workdir / "model"

    # cpu=True where there is no accelerator: accelerate then runs a multi-process launch over gloo
    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=not _has_accelerator())
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", world))  # an MPI launch sets no WORLD_SIZE
    if launched != world:  # every process would train alone and write the same folders
        raise ValueError(
            f"launched as {launched} processes but accelerate runs {world}; use `accelerate launch` or torchrun"
        )
    micro = config.gradient_accumulation * world
    if config.batch_size % micro:
        raise ValueError(
            f"--batch-size {config.batch_size} does not split into {config.gradient_accumulation} micro-batches "
            f"on each of {world} process(es); use a multiple of {micro}"
        )
    pipe = pipe if pipe is not None else load_pipeline(model, stock_pipeline_class(model))
    if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
        raise ValueError(
            "--model: a text-to-image pipeline with a text encoder expected (an SDXL refiner has none)"
        )
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if sdxl and config.train_text_encoder:
        raise ValueError("--train-text-encoder: not supported for SDXL (its two text encoders stay frozen)")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    height, width = data.pixels.shape[1:3]
    if height % pipe.vae_scale_factor or width % pipe.vae_scale_factor:
        raise ValueError(
            f"--resolution: {height} x {width} px is not a multiple of the VAE's factor {pipe.vae_scale_factor}"
        )
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    record = {
        "model": str(model) if model is not None else "(default organism)",
        "base_fingerprint": model_fingerprint(unet),
        "data": data.describe(),
        "mitigation": mitigation.config(),
        "config": config.to_dict(),
        **({"provenance": dict(provenance)} if provenance else {}),
    }
    if accelerator.is_main_process:
        remove_stale_temporaries([workdir])  # of a killed run's atomic writes (config.json, log.json)
        _check_workdir(workdir, record)
    accelerator.wait_for_everyone()

    device = accelerator.device
    latents = encode_latents(vae, data.pixels, device)

    def encode(captions: Sequence[str]):
        return caption_conditioning(pipe, captions, device, (height, width), grad=config.train_text_encoder)

    text_encoder.to(device).requires_grad_(config.train_text_encoder)
    if sdxl:
        pipe.text_encoder_2.to(device).requires_grad_(False)
    if config.mode == "lora":
        params = add_lora(unet, config.lora_rank, config.lora_targets, config.seed, config.trainable_blocks)
    else:
        params = set_trainable_blocks(unet, config.trainable_blocks)
    params = params + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    n_trainable = sum(p.numel() for p in params)
    optimizer = make_optimizer(params, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps > 0:
        name = "constant_with_warmup"
    schedule = get_scheduler(
        name, optimizer, num_warmup_steps=max(0, config.warmup_steps), num_training_steps=config.steps
    )
    modules = {"unet": unet} | ({"text_encoder": text_encoder} if config.train_text_encoder else {})
    trainable_only = ("unet",) if config.mode == "lora" else ()
    ckpt_root = workdir / "checkpoints"
    start, log, window, seconds = 0, [], [], 0.0
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, modules, {"adamw": optimizer}, {"lr": schedule})
        start = state["step"]
        log = [r for r in state["extra"].get("log", []) if r["step"] <= start]
        window = list(state["extra"].get("window", []))  # the steps since the last log row
        seconds = float(state["extra"].get("seconds", 0.0))
        if start > config.steps:
            raise ValueError(
                f"--out: {workdir} holds a run already at step {start}, past --steps {config.steps}; "
                "use another --out (a run cannot be wound back)"
            )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.train_text_encoder:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen module is not wrapped (DDP refuses a module without trainable parameters)
        unet, optimizer = accelerator.prepare(unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)
    unet.train()
    text_encoder.train(config.train_text_encoder)
    empty_cond, empty_added = (None, None) if config.train_text_encoder else encode([""])

    bar = tqdm(
        total=config.steps, initial=start, desc=f"train ({mitigation.name})", disable=not progress or rank
    )
    end = config.steps if until_step is None else min(config.steps, until_step)
    t0 = time.time()
    for step in range(start, end):
        rows, epochs = batch_indices(len(data), config.batch_size, step, config.seed)
        per_process = config.batch_size // world
        mine = slice(rank * per_process, (rank + 1) * per_process)
        rows, epochs = rows[mine], epochs[mine]
        seeds = [
            derive_seed(config.seed, "sample", int(e), data.row_ids[int(r)]) for r, e in zip(rows, epochs)
        ]
        captions = [data.captions[int(r)] for r in rows]
        captions, caption_stats = mitigation.edit_captions(captions, seeds, tokenizer)
        dropped = [float(torch.rand(1, generator=item_generator(s, "caption-dropout"))) for s in seeds]
        captions = ["" if d < config.caption_dropout else c for c, d in zip(captions, dropped)]
        steps = []  # every micro-batch prepared first: the loss is normalised over the whole step's kept samples
        n_micro = per_process // config.gradient_accumulation
        for k in range(config.gradient_accumulation):
            part = slice(k * n_micro, (k + 1) * n_micro)
            cond, added = encode(captions[part])
            empty, empty_extra = (empty_cond, empty_added) if empty_cond is not None else encode([""])
            batch = TrainingBatch(
                latents=latents[rows[part]].to(device),
                cond=cond,
                seeds=seeds[part],
                scheduler=noise_sched,
                ids=[data.image_ids[int(r)] for r in rows[part]],
                unet=raw_unet,
                empty_cond=empty,
                added_cond=added,
                empty_added_cond=empty_extra,
            )
            with accelerator.autocast():
                steps.append(mitigation.prepare(batch))
        kept = torch.tensor(float(sum((s.weight > 0).sum() for s in steps)), device=device)
        kept_total = float(accelerator.reduce(kept, reduction="sum")) if world > 1 else float(kept)
        loss_sum = torch.zeros((), device=device)
        if kept_total > 0:
            for k, s in enumerate(steps):
                if s.skip and world == 1:
                    continue  # no sample of this micro-batch is in the loss (DDP needs every process's backward)
                sync = k == len(steps) - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(unet), accelerator.autocast():
                    pred = unet(
                        s.noisy.to(device), s.timesteps.to(device), s.cond, added_cond_kwargs=s.added_cond
                    ).sample
                    weighted = (s.weight.to(device) * s.per_sample_loss(pred)).sum()
                accelerator.backward(weighted * (world / kept_total))
                loss_sum += weighted.detach()
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        with warnings.catch_warnings():  # a step with every sample left out has no optimizer step
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss_total = float(accelerator.reduce(loss_sum, reduction="sum")) if world > 1 else float(loss_sum)
        stats = merge_stats([caption_stats, *(s.stats for s in steps)])
        stats["kept"] = kept_total  # samples in the step's loss, all processes
        window.append({"loss": loss_total / kept_total if kept_total else None, **stats})
        bar.update(1)
        if window[-1]["loss"] is not None:
            bar.set_postfix(loss=f"{window[-1]['loss']:.4f}", refresh=False)
        done = step + 1
        if (
            done % LOG_EVERY == 0 or done == config.steps
        ):  # not at an interruption: a resume logs the same rows
            losses = [w["loss"] for w in window if w["loss"] is not None]
            row = {
                "step": done,
                "loss": sum(losses) / len(losses) if losses else None,
                "seconds": round(seconds + time.time() - t0, 1),
            }
            row.update(merge_stats([{k: v for k, v in w.items() if k != "loss"} for w in window]))
            log.append(row)
            window = []
            if on_log is not None and accelerator.is_main_process:
                on_log(row)
        if done % config.checkpoint_every == 0 or done in (config.steps, end):
            if accelerator.is_main_process:
                extra = {"log": log, "window": window, "seconds": seconds + time.time() - t0}
                save_checkpoint(
                    ckpt_root,
                    done,
                    modules,
                    {"adamw": optimizer},
                    {"lr": schedule},
                    extra=extra,
                    trainable_only=trainable_only,
                )
            accelerator.wait_for_everyone()
    bar.close()
    seconds += time.time() - t0
    if end < config.steps:
        return latest_checkpoint(ckpt_root)

    unet = accelerator.unwrap_model(unet).eval()
    if config.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    if config.mode == "lora":
        merge_lora(unet)
    unet.requires_grad_(False)
    pipe.unet = unet
    pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval().requires_grad_(False)
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return out
    losses = [r["loss"] for r in log if r["loss"] is not None]
    record["run"] = {
        "steps": config.steps,
        "pipeline": type(pipe).__name__,  # the class model_index.json names
        "seconds": round(seconds, 1),
        "processes": world,
        "trainable_parameters": n_trainable,
        "final_loss": losses[-1] if losses else None,
        "totals": merge_stats(
            [{k: v for k, v in r.items() if k not in ("step", "loss", "seconds")} for r in log]
        ),
        "machine": _machine(),
        "log": log,
    }
    atomic_write_json(workdir / "log.json", log)
    files = {TRAIN_RECORD: json.dumps(record, indent=2) + "\n", "README.md": model_card(record)}
    _save_pipeline(pipe.to("cpu"), out, files)
    accelerator.wait_for_everyone()
    return out
