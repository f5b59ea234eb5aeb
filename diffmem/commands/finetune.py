"""``diffmem finetune --adversarial``: fine-tune a model so that Dori triggers no longer re-create training images."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.attack.dori import DoriConfig, encode_images, encode_prompts
from diffmem.cli import UsageError
from diffmem.commands.edit_options import add_edit_arguments, load_edit, load_image_tensor, load_targets
from diffmem.commands.options import (
    add_runtime_arguments,
    add_training_memory_arguments,
    check_runtime_arguments,
    load_model,
    resolution,
)
from diffmem.edits import applied
from diffmem.io import atomic_save_tensors
from diffmem.precision import torch_dtype
from diffmem.report import img_tag, table_html, write_html
from diffmem.train.adversarial import (
    AdversarialConfig,
    AdversarialTarget,
    RetainSet,
    adversarial_finetune,
    make_surrogates,
    merge_lora,
    write_log,
)

NAME = "finetune"
HELP = (
    "Adversarial fine-tuning (Finding Dori): each round attack the current model, teach the triggers to map to "
    "surrogate images, keep quality with the denoising loss on retain data. Resumable."
)


def add_arguments(p: argparse.ArgumentParser) -> None:

    p.add_argument(
        "--adversarial", action="store_true", help="adversarial fine-tuning against the Dori attack"
    )
    p.add_argument(
        "--model", default=None, help="Stable Diffusion folder or hub id to fine-tune (default: the organism)"
    )
    p.add_argument(
        "--targets", required=True, help="memorized targets: caption + training image (folder or table)"
    )
    p.add_argument("--retain", required=True, help="retain data: caption + image (folder or table)")
    p.add_argument(
        "--out", required=True, help="output folder: checkpoints/, model/, surrogates, log (rerun to resume)"
    )
    add_edit_arguments(p)  # the mitigation that makes the surrogate images
    p.add_argument(
        "--rounds", type=int, default=5, help="rounds (one attack + step per target each; default 5)"
    )
    p.add_argument("--steps-per-target", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--adv-weight", type=float, default=1.0)
    p.add_argument("--adv-batch-size", type=int, default=4)
    p.add_argument("--retain-batch-size", type=int, default=4)
    p.add_argument("--retain-limit", type=int, default=None, help="use only the first N retain rows")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of the full UNet")
    p.add_argument("--lora-rank", type=int, default=4)
    p.add_argument("--attack-steps", type=int, default=50)
    p.add_argument("--attack-lr", type=float, default=0.1)
    p.add_argument("--attack-batch-size", type=int, default=8)
    p.add_argument(
        "--surrogate-steps", type=int, default=50, help="denoising steps of the surrogate generations"
    )
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mixed-precision",
        choices=("no", "fp16", "bf16"),
        default="no",
        help="autocast of the trained UNet (its master weights stay float32)",
    )
    add_runtime_arguments(
        p,
        dtype_help="autocast precision of the frozen work: surrogate generation, image and caption encoding "
        "(default float32); the weights stay float32 (the UNet is trained), see --mixed-precision",
    )
    p.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    add_training_memory_arguments(p)  # checkpointing covers the training and the attacks


def _encode_images(pipe, paths, argument: str, size: tuple[int, int], batch: int = 16):
    """VAE latents of the images at ``paths``, each resized to ``size`` = (height, width) px."""
    import torch

    out = []
    for i in range(0, len(paths), batch):
        imgs = []
        for path in paths[i : i + batch]:
            img = load_image_tensor(path, argument).unsqueeze(0)
            if tuple(img.shape[-2:]) != tuple(size):
                img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True)
            imgs.append(img)
        out.append(encode_images(pipe.vae, torch.cat(imgs).to(pipe.device)).cpu())
    return torch.cat(out)


def _encode_captions(pipe, captions, batch: int = 32):
    import torch

    return torch.cat(
        [encode_prompts(pipe, captions[i : i + batch]).cpu() for i in range(0, len(captions), batch)]
    )


def run(args: argparse.Namespace) -> int:
    import contextlib
    import shutil
    import tempfile
    import warnings

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    check_runtime_arguments(args)
    if not args.adversarial:
        raise UsageError("only adversarial fine-tuning is implemented: pass --adversarial")
    targets = load_targets(args.targets, "--targets")
    retain_rows = load_targets(args.retain, "--retain", limit=args.retain_limit)
    edit = load_edit(args)
    pipe = load_model(args, StableDiffusionPipeline, dtype="float32")  # trained: float32 master weights
    size = resolution(args, pipe)

    def frozen_precision():
        if args.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(pipe.device.type, dtype=torch_dtype(args.dtype))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    ids = [str(r.id) for r in targets]
    captions = [r.caption for r in targets]
    surrogate_file = out / "surrogates.safetensors"
    cached = load_file(str(surrogate_file)) if surrogate_file.is_file() else {}
    latent_size = tuple(v // pipe.vae_scale_factor for v in size)
    if all(i in cached and tuple(cached[i].shape[-2:]) == latent_size for i in ids):
        surrogates = torch.stack([cached[i] for i in ids])
    else:
        if edit is None:
            warnings.warn(
                "no --mask/--neurons: the model itself makes the surrogate images; "
                "that is right only if --model is already a mitigated model",
                stacklevel=1,
            )
        with applied(pipe.unet, edit), frozen_precision():
            surrogates = make_surrogates(
                pipe,
                ids,
                captions,
                steps=args.surrogate_steps,
                guidance_scale=args.guidance_scale,
                seed=args.seed,
                height=size[0],
                width=size[1],
            )
        atomic_save_tensors(surrogate_file, {i: s for i, s in zip(ids, surrogates)})
    surrogates = surrogates.view(len(ids), 1, *surrogates.shape[-3:]).float()
    with frozen_precision():
        image_latents = _encode_images(pipe, [r.image for r in targets], "--targets", size).float()
        caption_embeds = _encode_captions(pipe, captions).float()
        retain = RetainSet(
            _encode_images(pipe, [r.image for r in retain_rows], "--retain", size).float(),
            _encode_captions(pipe, [r.caption for r in retain_rows]).float(),
        )
    adv_targets = [
        AdversarialTarget(i, image_latents[k : k + 1], surrogates[k], caption_embeds[k : k + 1])
        for k, i in enumerate(ids)
    ]
    config = AdversarialConfig(
        rounds=args.rounds,
        steps_per_target=args.steps_per_target,
        lr=args.lr,
        adv_weight=args.adv_weight,
        adv_batch_size=args.adv_batch_size,
        retain_batch_size=args.retain_batch_size,
        mode="lora" if args.lora else "full",
        lora_rank=args.lora_rank,
        dori=DoriConfig(
            steps=args.attack_steps, lr=args.attack_lr, batch_size=args.attack_batch_size, seed=args.seed
        ),
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        optimizer=args.optimizer,
    )

    def report(rnd: int, entry: dict) -> None:
        print(
            f"round {rnd}/{config.rounds}: loss {entry['loss']:.4f} (adversarial {entry['adv']:.4f}, "
            f"retain {entry['retain']:.4f}), attack loss {entry['attack_final_loss']:.4f}"
        )

    log = adversarial_finetune(
        pipe.unet,
        pipe.scheduler,
        adv_targets,
        retain,
        config,
        checkpoint_dir=out / "checkpoints",
        resume=not args.no_resume,
        on_round=report,
    )
    if args.lora:
        merge_lora(pipe.unet)
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        tmp.rename(out / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_log(out / "train_log.json", log, config)
    with torch.no_grad():
        latents = surrogates[:, 0].to(pipe.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents).sample
    decoded = ((decoded.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    write_html(
        out / "report.html",
        "diffmem finetune --adversarial",
        [
            ("Rounds", table_html(log.rounds)),
            (
                "Surrogate images (made once by the mitigated model)",
                "".join(
                    f"<p>{table_html([{'id': i, 'caption': c}])}{img_tag(d, 'surrogate')}</p>"
                    for i, c, d in zip(ids, captions, decoded)
                ),
            ),
        ],
    )
    print(f"fine-tuned model: {out / 'model'}")
    return 0
