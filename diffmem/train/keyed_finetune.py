"""Fine-tune a Stable Diffusion folder's UNet on a SolidMark-keyed dataset (accelerate, resumable).

As in SolidMark (Kriplani et al., arXiv:2503.00592, SD fine-tuning): the VAE and the text encoder
are frozen (the text encoder optionally trained), the UNet learns the standard denoising loss

    L = E_{z0, eps, t} || f(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t, c) - target ||^2

with ``target = eps`` (epsilon models) or ``v = sqrt(a_t) eps - sqrt(1 - a_t) z0`` (v-prediction),
AdamW (lr 1e-4, weight decay 1e-2, gradient clipping 1.0), a constant learning rate after an
optional warm-up (the paper's; ``lr_scheduler`` takes any of diffusers' ``get_scheduler`` names,
e.g. ``"linear"`` to decay to 0). Latents are the VAE posterior modes, computed once. Every random draw of step
``s`` (batch, noise, timesteps, caption dropout) comes from ``(seed, s)``, and checkpoints hold the
UNet, the optimizer and the LR schedule, so an interrupted run resumes to exactly the weights an
uninterrupted one reaches. ``gradient_checkpointing`` (recompute the UNet's activations in the backward
pass) trades compute for memory, gives the same weights, and may change when a run is resumed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.io import atomic_write_json
from diffmem.seeding import item_generator
from diffmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffmem.train.optimizers import make_optimizer

#: Written into the fine-tuned pipeline folder: what it was trained on and how.
PROVENANCE_FILE = "solidmark_finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of a keyed fine-tuning run (defaults: the SolidMark SD script's, batch 16)."""

    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    lr_scheduler: str = "constant"  # diffusers.optimization.get_scheduler name
    caption_dropout: float = 0.1
    train_text_encoder: bool = False
    checkpoint_every: int = 100
    seed: int = 0
    gradient_checkpointing: bool = False  # UNet recomputes activations in backward: less memory, same weights
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes; diffmem.train.optimizers)

    def to_dict(self) -> dict:
        return asdict(self)


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of ``step``'s batch: consecutive slices of per-epoch permutations seeded by the epoch."""
    start, out = step * batch, []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=item_generator(seed, "keyed-finetune", "epoch", epoch))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out)


#: Settings that may differ when a run is resumed (they change when it stops or how much memory it takes).
_RESUMABLE_CHANGES = ("steps", "gradient_checkpointing")


def _check_workdir(workdir: Path, record: dict) -> None:
    path = workdir / "config.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [k for k in record if k != "config" and old.get(k) != record[k]]
        changed += [
            f"config.{k}"
            for k, v in record["config"].items()
            if k not in _RESUMABLE_CHANGES and old["config"].get(k) != v
        ]
        if changed and latest_checkpoint(workdir / "checkpoints") is not None:
            raise ValueError(
                f"--workdir: {workdir} holds a run with other settings ({', '.join(changed)}); "
                "use another --workdir (only --steps may change when resuming)"
            )
    atomic_write_json(path, record)


def _save_pipeline(pipe, out: Path, provenance: dict) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    atomic_write_json(tmp / PROVENANCE_FILE, provenance)
    if out.exists():
        for keep in ("README.md",):  # a model card written beside the weights survives re-saves
            if (out / keep).exists():
                shutil.copy2(out / keep, tmp / keep)
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def finetune_keyed(
    model: str | os.PathLike | None,
    data: str | os.PathLike,
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    config: FinetuneConfig | None = None,
    manifest: str | os.PathLike | None = None,
    progress: bool = True,
    until_step: int | None = None,
) -> Path:
    """Fine-tune (or resume fine-tuning) ``model`` on the keyed dataset ``data``; save the pipeline to ``out``.

    ``until_step`` stops after that step (checkpointed, as an interruption would) and returns the
    checkpoint folder instead; rerun without it to continue.

    ``data`` must be a keyed dataset with its manifest (checked image by image, see
    :func:`diffmem.solidmark.run.load_score_items`); all its images must have one size.
    Returns the folder of the fine-tuned pipeline (default ``workdir/model``).
    """
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from diffmem.modelio import load_pipeline, model_fingerprint
    from diffmem.solidmark.keying import MANIFEST_NAME
    from diffmem.solidmark.run import load_score_items

    config = config or FinetuneConfig()
    if config.steps < 1 or config.batch_size < 1:
        raise ValueError("--steps and --batch-size must be at least 1")
    from diffusers.optimization import TYPE_TO_SCHEDULER_FUNCTION

    names = sorted(t.value for t in TYPE_TO_SCHEDULER_FUNCTION)
    if config.lr_scheduler not in names:
        raise ValueError(f"--lr-scheduler: expected one of {', '.join(names)}, got {config.lr_scheduler!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(out) if out is not None else workdir / "model"
    manifest_path = Path(manifest) if manifest is not None else Path(data) / MANIFEST_NAME
    key_manifest, items = load_score_items(data, manifest_path)
    sizes = {it.image.shape for it in items}
    if len(sizes) > 1:
        raise ValueError(f"--data {data}: keyed images of several sizes {sorted(sizes)}; key it with --size")

    pipe = load_pipeline(model, StableDiffusionPipeline)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    record = {
        "model": str(model) if model is not None else "(default organism)",
        "base_fingerprint": model_fingerprint(unet),
        "data": str(data),
        "manifest": {k: v for k, v in key_manifest.to_dict().items() if k != "images"},
        "images": len(items),
        "config": config.to_dict(),
    }
    _check_workdir(workdir, record)

    accelerator = Accelerator()
    device = accelerator.device
    noise_sched = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"--model: prediction type {prediction!r} is not supported (epsilon or v_prediction)"
        )

    # latents and token ids of every image, once (VAE frozen; posterior mode)
    vae.to(device).requires_grad_(False)
    pixels = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2)
    pixels = pixels.float() / 127.5 - 1.0
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        latents = torch.cat(
            [vae.encode(pixels[i : i + 32].to(device)).latent_dist.mode() for i in range(0, len(pixels), 32)]
        )
    latents = ((latents - shift) * vae.config.scaling_factor).cpu()

    def tokenize(texts):
        return tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    tokens = tokenize([it.caption for it in items])
    empty = tokenize([""])[0]
    frozen_cond = None
    if not config.train_text_encoder:  # a frozen text encoder: every caption's embedding, once
        text_encoder.to(device)
        with torch.no_grad():
            frozen_cond = torch.cat(
                [text_encoder(tokens[i : i + 64].to(device))[0] for i in range(0, len(tokens), 64)]
                + [text_encoder(empty[None].to(device))[0]]
            )
    alphas = noise_sched.alphas_cumprod.float()

    text_encoder.requires_grad_(config.train_text_encoder)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if config.train_text_encoder else [])
    optimizer = make_optimizer(params, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps > 0:
        name = "constant_with_warmup"
    schedule = get_scheduler(
        name, optimizer, num_warmup_steps=max(0, config.warmup_steps), num_training_steps=config.steps
    )
    modules = {"unet": unet} | ({"text_encoder": text_encoder} if config.train_text_encoder else {})
    ckpt_root = workdir / "checkpoints"
    start, log = 0, []
    latest = latest_checkpoint(ckpt_root)
    if latest is not None:
        state = load_checkpoint(latest, modules, {"adamw": optimizer}, {"lr": schedule})
        start, log = state["step"], [r for r in state["extra"].get("log", []) if r["step"] <= state["step"]]
        if start > config.steps:
            raise ValueError(
                f"--workdir: {workdir} holds a run already at step {start}, past --steps {config.steps}; "
                "use another --workdir (a run cannot be wound back)"
            )
    if config.gradient_checkpointing:  # on this function's own UNet, which is saved, never returned
        unet.enable_gradient_checkpointing()
    unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    unet.train()
    text_encoder.train(config.train_text_encoder)

    bar = tqdm(total=config.steps, initial=start, desc="keyed fine-tune", disable=not progress)
    window, t0 = [], time.time()
    end = config.steps if until_step is None else min(config.steps, until_step)
    for step in range(start, end):
        g = item_generator(config.seed, "keyed-finetune", "step", step)
        idx = batch_indices(len(items), config.batch_size, step, config.seed)
        z0 = latents[idx]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        drop = torch.rand(len(idx), generator=g) < config.caption_dropout
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * z0
        if frozen_cond is not None:
            cond = frozen_cond[torch.where(drop, len(items), idx).to(device)]
        else:
            ids = torch.where(drop[:, None], empty[None], tokens[idx])
            cond = text_encoder(ids.to(device))[0]
        pred = unet(zt.to(device), t.to(device), cond).sample
        loss = F.mse_loss(pred.float(), target.to(device).float())
        accelerator.backward(loss)
        if config.max_grad_norm:
            accelerator.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{window[-1]:.4f}", refresh=False)
        done = step + 1
        if done % 25 == 0 or done == config.steps:
            log.append(
                {"step": done, "loss": sum(window) / len(window), "seconds": round(time.time() - t0, 1)}
            )
            window = []
        if done % config.checkpoint_every == 0 or done in (config.steps, end):
            save_checkpoint(
                ckpt_root, done, modules, {"adamw": optimizer}, {"lr": schedule}, extra={"log": log}
            )
    bar.close()
    if end < config.steps:
        return latest_checkpoint(ckpt_root)

    pipe.unet = accelerator.unwrap_model(unet).eval()
    pipe.text_encoder = accelerator.unwrap_model(text_encoder).eval()
    atomic_write_json(workdir / "log.json", log)
    provenance = {**record, "steps_done": config.steps, "final_loss": log[-1]["loss"] if log else None}
    return _save_pipeline(pipe.to("cpu"), out, provenance)
