"""Adversarial fine-tuning of a whole pipeline against Finding Dori (``diffmem finetune --adversarial``):
surrogate images from the mitigated model, the fine-tune, the saved model, its log and report."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

from diffmem.attack.dori import encode_images, encode_prompts
from diffmem.attack.targets import load_image_tensor
from diffmem.edits import Edit, applied
from diffmem.io import atomic_save_tensors
from diffmem.precision import torch_dtype
from diffmem.records import Record
from diffmem.report import img_tag, table_html, write_html
from diffmem.train.adversarial import (
    AdversarialConfig,
    AdversarialLog,
    AdversarialTarget,
    RetainSet,
    adversarial_finetune,
    make_surrogates,
    merge_lora,
    write_log,
)


def _encode_images(pipe, paths, argument: str, size: tuple[int, int], batch: int = 16) -> torch.Tensor:
    """VAE latents of the images at ``paths``, each resized to ``size`` = (height, width) px."""
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


def _encode_captions(pipe, captions, batch: int = 32) -> torch.Tensor:
    return torch.cat(
        [encode_prompts(pipe, captions[i : i + batch]).cpu() for i in range(0, len(captions), batch)]
    )


def _frozen_precision(pipe, dtype: str):
    """Autocast of the frozen work (surrogates, encodings) at ``dtype``; nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(pipe.device.type, dtype=torch_dtype(dtype))


def surrogate_latents(
    pipe,
    ids: list[str],
    captions: list[str],
    path: Path,
    *,
    edit: Edit | None,
    dtype: str,
    steps: int,
    guidance_scale: float,
    seed: int,
    size: tuple[int, int],
) -> torch.Tensor:
    """One generation per caption by the model with ``edit`` applied, ``[N, 1, C, h, w]`` float32;
    cached in ``path`` (reused while it holds every id at this size)."""
    cached = load_file(str(path)) if path.is_file() else {}
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
        with applied(pipe.unet, edit), _frozen_precision(pipe, dtype):
            surrogates = make_surrogates(
                pipe,
                ids,
                captions,
                steps=steps,
                guidance_scale=guidance_scale,
                seed=seed,
                height=size[0],
                width=size[1],
            )
        atomic_save_tensors(path, {i: s for i, s in zip(ids, surrogates)})
    return surrogates.view(len(ids), 1, *surrogates.shape[-3:]).float()


def _save_model(pipe, folder: Path) -> None:
    """``save_pretrained`` into a temporary folder beside ``folder``, then renamed into its place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_report(pipe, path: Path, log: AdversarialLog, ids, captions, surrogates: torch.Tensor) -> None:
    with torch.no_grad():
        latents = surrogates[:, 0].to(pipe.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents).sample
    decoded = ((decoded.float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    write_html(
        path,
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


def adversarial_finetune_pipeline(
    pipe,
    targets: Sequence[Record],
    retain_rows: Sequence[Record],
    out: str | Path,
    config: AdversarialConfig,
    *,
    edit: Edit | None = None,
    dtype: str = "float32",
    surrogate_steps: int = 50,
    guidance_scale: float = 7.5,
    size: tuple[int, int],
    resume: bool = True,
    on_round: Callable[[int, dict], None] | None = None,
) -> Path:
    """Fine-tune ``pipe``'s float32 UNet so that Dori triggers of ``targets`` map to the images the model
    with ``edit`` makes, keeping quality on ``retain_rows``; resumable from ``out/checkpoints``.

    Writes ``out/surrogates.safetensors``, ``out/model`` (LoRA merged), ``out/train_log.json`` and
    ``out/report.html``; returns ``out/model``. ``dtype``: autocast of the frozen work (surrogates,
    encodings), ``size`` = (height, width) px of the images.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [str(r.id) for r in targets]
    captions = [r.caption for r in targets]
    surrogates = surrogate_latents(
        pipe,
        ids,
        captions,
        out / "surrogates.safetensors",
        edit=edit,
        dtype=dtype,
        steps=surrogate_steps,
        guidance_scale=guidance_scale,
        seed=config.seed,
        size=size,
    )
    with _frozen_precision(pipe, dtype):
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
    log = adversarial_finetune(
        pipe.unet,
        pipe.scheduler,
        adv_targets,
        retain,
        config,
        checkpoint_dir=out / "checkpoints",
        resume=resume,
        on_round=on_round,
    )
    if config.mode == "lora":
        merge_lora(pipe.unet)
    _save_model(pipe, out / "model")
    write_log(out / "train_log.json", log, config)
    _write_report(pipe, out / "report.html", log, ids, captions, surrogates)
    return out / "model"
