"""Adversarial fine-tuning of a model folder against the Dori attack, from files to a saved model.

What ``diffmem finetune --adversarial`` and the SolidMark evaluation both run: read the targets and the
retain data (caption + image), make each target's surrogate image once with a mitigating edit applied
(cached in ``out/surrogates.safetensors``), encode images and captions, run
:func:`diffmem.train.adversarial.adversarial_finetune` (checkpointed in ``out/checkpoints``, resumable), and
write ``out/model``, ``out/train_log.json`` and ``out/report.html``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from diffmem.attack.dori import encode_images, encode_prompts
from diffmem.data import load_rgb, open_dataset, split_rows
from diffmem.edits import applied
from diffmem.io import atomic_save_tensors
from diffmem.precision import torch_dtype
from diffmem.records import BadImageError, Record
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

__all__ = ["finetune_against_dori", "load_image_tensor", "load_targets"]


def load_targets(
    path: str | os.PathLike, argument: str = "--targets", limit: int | None = None
) -> list[Record]:
    """(id, caption, image path) records of a targets dataset; the first bad row is an error naming it."""
    records, bad = split_rows(open_dataset(path, argument=argument))
    if bad:
        b = bad[0]
        raise ValueError(f"{argument}: {b.source or path} row {b.row} (id {b.id}): {b.reason}: {b.detail}")
    if not records:
        raise ValueError(f"{argument}: {path} holds no targets")
    return records[:limit] if limit else records


def load_image_tensor(path, argument: str = "--targets") -> torch.Tensor:
    """An image file as a float ``[3, H, W]`` tensor in [0, 1]."""
    try:
        im = load_rgb(path)
    except BadImageError as err:
        raise ValueError(f"{argument}: {path}: {err}") from err
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


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


def _encode_captions(pipe, captions: Sequence[str], batch: int = 32) -> torch.Tensor:
    return torch.cat(
        [encode_prompts(pipe, captions[i : i + batch]).cpu() for i in range(0, len(captions), batch)]
    )


def _surrogates(pipe, ids, captions, out: Path, edit, size, frozen_precision, **settings) -> torch.Tensor:
    """Each target's surrogate latents, made once by the model with ``edit`` applied (cached by id)."""
    surrogate_file = out / "surrogates.safetensors"
    cached = load_file(str(surrogate_file)) if surrogate_file.is_file() else {}
    latent_size = tuple(v // pipe.vae_scale_factor for v in size)
    if all(i in cached and tuple(cached[i].shape[-2:]) == latent_size for i in ids):
        return torch.stack([cached[i] for i in ids])
    if edit is None:
        warnings.warn(
            "no --mask/--neurons: the model itself makes the surrogate images; "
            "that is right only if --model is already a mitigated model",
            stacklevel=2,
        )
    with applied(pipe.unet, edit), frozen_precision():
        surrogates = make_surrogates(pipe, ids, captions, height=size[0], width=size[1], **settings)
    atomic_save_tensors(surrogate_file, {i: s for i, s in zip(ids, surrogates)})
    return surrogates


def _save_model(pipe, out: Path) -> Path:
    """``pipe`` saved to ``out/model`` (written beside it and renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=out))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if (out / "model").exists():
            shutil.rmtree(out / "model")
        tmp.rename(out / "model")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "model"


def _write_report(pipe, out: Path, log, ids, captions, surrogates: torch.Tensor) -> None:
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


def finetune_against_dori(
    pipe,
    targets: Sequence[Record],
    retain_rows: Sequence[Record],
    out: str | os.PathLike,
    config: AdversarialConfig,
    *,
    size: tuple[int, int],
    edit=None,
    surrogate_steps: int = 50,
    guidance_scale: float = 7.5,
    dtype: str = "float32",
    resume: bool = True,
    on_round: Callable[[int, dict], None] | None = None,
) -> Path:
    """Fine-tune ``pipe`` (a stock pipeline in float32: its UNet is trained) against the Dori attack on
    ``targets`` with ``retain_rows`` as retain data, resumably in ``out``; returns the saved model folder.

    ``edit`` (a ``NeuronSet`` or ``WeightMask``) is applied while the surrogate images are made; ``dtype`` is
    the autocast precision of the frozen work (surrogates, image and caption encoding)."""

    def frozen_precision():
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(pipe.device.type, dtype=torch_dtype(dtype))

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [str(r.id) for r in targets]
    captions = [r.caption for r in targets]
    surrogates = _surrogates(
        pipe, ids, captions, out, edit, size, frozen_precision,
        steps=surrogate_steps, guidance_scale=guidance_scale, seed=config.seed,
    )  # fmt: skip
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
    model = _save_model(pipe, out)
    write_log(out / "train_log.json", log, config)
    _write_report(pipe, out, log, ids, captions, surrogates)
    return model
