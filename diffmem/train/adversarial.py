"""Adversarial fine-tuning against the Finding Dori attack (Kowalczuk et al., ICML 2026, arXiv 2507.16880).

Each round, for every memorized target ``(x, c)``:

1. run the Dori search (:func:`diffmem.attack.dori.dori_search`) against the *current* UNet to get a
   fresh trigger ``y_adv`` that re-creates ``x``;
2. take an optimizer step on ::

       L = L_DM(θ; retain batch) + λ · ‖target(z̃, ε, t) − f_θ(add_noise(z̃, ε, t), t, y_adv)‖²

   where ``z̃`` is the target's *surrogate*: an image of the same caption made once by a mitigated
   model (e.g. with a NeMo ``NeuronSet`` or a pruning ``WeightMask`` applied), so the trigger is taught
   to lead to a non-copied image of the same content, and ``L_DM`` is the ordinary denoising loss on
   retain data (caption, image) that keeps general quality.

Full fine-tuning or LoRA (peft) adapters; runs on accelerate. Every random draw comes from
``(seed, round, target)`` (:mod:`diffmem.seeding`), and after each round the UNet (in LoRA mode only
its adapters), the optimizer and the round are checkpointed (:mod:`diffmem.train.checkpoint`,
safetensors + JSON), so an interrupted run resumes to exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from diffmem.attack.dori import DoriConfig, denoising_loss, dori_search, gradient_checkpointing
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_write_text
from diffmem.seeding import item_generator
from diffmem.train.adapters import DEFAULT_LORA_TARGETS, add_lora, merge_lora  # noqa: F401 (re-exported)
from diffmem.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from diffmem.train.optimizers import make_optimizer


@dataclass(frozen=True)
class AdversarialConfig:
    """Settings of adversarial fine-tuning (the paper trains the full UNet for 5 epochs; lr etc. unpublished)."""

    rounds: int = 5
    steps_per_target: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    adv_weight: float = 1.0
    adv_batch_size: int = 4  # (ε, t) pairs for the adversarial term per step
    retain_batch_size: int = 4
    max_grad_norm: float = 1.0
    mode: str = "full"  # "full" or "lora"
    lora_rank: int = 4
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    dori: DoriConfig = DoriConfig()
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # for the whole run, the Dori searches included
    optimizer: str = "adamw"  # or "adamw8bit" (bitsandbytes; diffmem.train.optimizers)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return d


@dataclass
class AdversarialTarget:
    """A memorized target: latents of its training image (attacked), of its surrogate (taught), its caption embedding."""

    id: str
    image_latents: torch.Tensor  # [1, C, h, w]
    surrogate_latents: torch.Tensor  # [1, C, h, w]
    caption_embeds: torch.Tensor  # [1, tokens, dim]


@dataclass
class RetainSet:
    """Precomputed retain data: VAE latents ``[N, C, h, w]`` and text embeddings ``[N, tokens, dim]``."""

    latents: torch.Tensor
    embeds: torch.Tensor

    def __post_init__(self) -> None:
        if self.latents.shape[0] != self.embeds.shape[0] or self.latents.shape[0] == 0:
            raise ValueError(
                f"retain set: {self.latents.shape[0]} latents for {self.embeds.shape[0]} captions"
            )


@dataclass
class AdversarialLog:
    """Per-round means of the losses and of the attack's loss (after the search) on each target."""

    rounds: list[dict] = field(default_factory=list)


def _retain_batch(retain: RetainSet, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(retain.latents.shape[0], generator=generator)[:n]
    if idx.numel() < n:  # fewer retain items than the batch: sample with replacement
        idx = torch.randint(0, retain.latents.shape[0], (n,), generator=generator)
    return retain.latents[idx], retain.embeds[idx]


def _noise_and_t(latents: torch.Tensor, n: int, num_train_timesteps: int, generator: torch.Generator):
    noise = torch.randn((n, *latents.shape[1:]), generator=generator)
    t = torch.randint(0, num_train_timesteps, (n,), generator=generator)
    return noise.to(latents.device, latents.dtype), t.to(latents.device)


def adversarial_finetune(
    unet: nn.Module,
    scheduler,
    targets: Sequence[AdversarialTarget],
    retain: RetainSet,
    config: AdversarialConfig = AdversarialConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = True,
    accelerator=None,
    progress: bool = True,
    stop_after_round: int | None = None,
    on_round: Callable[[int, dict], None] | None = None,
) -> AdversarialLog:
    """Adversarially fine-tune ``unet`` in place (see the module docstring); returns the per-round log.

    With ``checkpoint_dir`` a checkpoint is written after each round and, with ``resume``, training
    continues after the newest one. ``stop_after_round`` ends the run early (as an interruption would)
    after that many rounds in total. In LoRA mode the adapters stay in ``unet`` (``merge_lora`` folds them)
    and checkpoints hold only them (resume rebuilds them on the same base model, then loads them).
    With ``config.gradient_checkpointing`` the UNet recomputes activations in every backward pass (its
    previous setting is restored at the end).
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    if config.mode not in ("full", "lora"):
        raise ValueError(f"mode must be 'full' or 'lora', got {config.mode!r}")
    if not targets:
        raise ValueError("adversarial fine-tuning needs at least one target")
    accelerator = accelerator or Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    base = None  # adapter-only checkpoints resume on the base model they were trained on, only
    if config.mode == "lora":
        if checkpoint_dir is not None:
            base = model_fingerprint(unet)
        params = add_lora(unet, config.lora_rank, config.lora_targets, config.seed)
    else:
        unet.requires_grad_(True)
        params = list(unet.parameters())
    unet.to(device)
    optimizer = make_optimizer(params, config.optimizer, lr=config.lr, weight_decay=config.weight_decay)
    model, optimizer = accelerator.prepare(unet, optimizer)
    raw = accelerator.unwrap_model(model)
    log = AdversarialLog()
    start = 0
    if checkpoint_dir is not None and resume:
        last = latest_checkpoint(checkpoint_dir)
        if last is not None:
            state = load_checkpoint(last, {"unet": raw}, {"optimizer": optimizer})
            saved = state["extra"].get("base_fingerprint")
            if base is not None and saved is not None and saved != base:
                raise ValueError(
                    f"checkpoint {last} holds LoRA adapters trained on another base model "
                    f"({saved}; this UNet is {base}): use another checkpoint folder"
                )
            start = int(state["step"])
            log.rounds = list(state["extra"].get("log", []))
    n_train = scheduler.config.num_train_timesteps
    end = config.rounds if stop_after_round is None else min(config.rounds, stop_after_round)
    bar = tqdm(
        total=(end - start) * len(targets),
        desc="adversarial fine-tuning",
        unit="target",
        disable=not progress,
    )
    with gradient_checkpointing(raw, config.gradient_checkpointing):
        for rnd in range(start, end):
            totals = {"loss": 0.0, "adv": 0.0, "retain": 0.0, "attack_final_loss": 0.0}
            for target in targets:
                trigger = dori_search(
                    raw,
                    scheduler,
                    target.image_latents.to(device),
                    target.caption_embeds.to(device),
                    config.dori,
                    key=("adversarial", rnd, target.id),
                )
                totals["attack_final_loss"] += trigger.final_loss
                model.train()
                for k in range(config.steps_per_target):
                    gen = item_generator(config.seed, "adv-step", rnd, target.id, k)
                    z = target.surrogate_latents.to(device)
                    noise, t = _noise_and_t(z, config.adv_batch_size, n_train, gen)
                    r_lat, r_emb = _retain_batch(retain, config.retain_batch_size, gen)
                    r_lat, r_emb = r_lat.to(device), r_emb.to(device)
                    r_noise, r_t = _noise_and_t(r_lat, r_lat.shape[0], n_train, gen)
                    with accelerator.autocast():
                        adv = denoising_loss(model, scheduler, z, trigger.embeds.to(device), noise, t)
                        keep = denoising_loss(model, scheduler, r_lat, r_emb, r_noise, r_t)
                        loss = keep + config.adv_weight * adv
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    if config.max_grad_norm:
                        accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    optimizer.step()
                    totals["loss"] += float(loss.detach()) / config.steps_per_target
                    totals["adv"] += float(adv.detach()) / config.steps_per_target
                    totals["retain"] += float(keep.detach()) / config.steps_per_target
                model.eval()
                bar.update(1)
            entry = {"round": rnd + 1, **{k: v / len(targets) for k, v in totals.items()}}
            log.rounds.append(entry)
            if checkpoint_dir is not None and accelerator.is_main_process:
                save_checkpoint(
                    checkpoint_dir,
                    rnd + 1,
                    {"unet": raw},
                    {"optimizer": optimizer},
                    extra={"log": log.rounds, "config": config.to_dict(), "base_fingerprint": base},
                    trainable_only=("unet",) if config.mode == "lora" else (),
                )
            if on_round is not None:
                on_round(rnd + 1, entry)
    bar.close()
    optimizer.zero_grad(set_to_none=True)
    raw.requires_grad_(False)
    return log


def write_log(path: str | os.PathLike, log: AdversarialLog, config: AdversarialConfig) -> Path:
    """The per-round log and the settings as JSON (atomically)."""

    return atomic_write_text(
        path, json.dumps({"config": config.to_dict(), "rounds": log.rounds}, indent=2) + "\n"
    )


def make_surrogates(pipe, ids, captions, *, steps: int, guidance_scale: float, seed: int, **pipe_kwargs):
    """Latents ``[N, C, h, w]`` of one generation per caption by ``pipe`` as it is (edit applied by the caller).

    ``pipe_kwargs`` go to every call (``height``, ``width``, ...).
    """
    import torch

    out = []
    for rid, caption in zip(ids, captions):
        res = pipe(
            caption,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=item_generator(seed, "surrogate", rid, device=pipe.device),
            output_type="latent",
            **pipe_kwargs,
        )
        out.append(res.images.float().cpu())
    return torch.cat(out)
