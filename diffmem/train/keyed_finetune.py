"""Fine-tune a Stable Diffusion folder's UNet on a SolidMark-keyed dataset (``diffmem solidmark finetune``).

As in SolidMark (Kriplani et al., arXiv:2503.00592, SD fine-tuning): the standard denoising loss, VAE and
text encoder frozen (the text encoder optionally trained), AdamW (lr 1e-4, weight decay 1e-2, gradient
clipping 1.0), a constant learning rate after an optional warm-up. The loop is ``diffmem train``'s
(:func:`diffmem.train.text_to_image.train_text_to_image`, mitigation ``none``): checkpoints, exact resume,
accelerate. This module only reads the keyed dataset (checked against its manifest) and records the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from diffmem.io import atomic_write_json
from diffmem.solidmark.keying import MANIFEST_NAME
from diffmem.solidmark.run import load_score_items
from diffmem.train.text_to_image import TRAIN_RECORD, TrainConfig, TrainingData, train_text_to_image

#: Written into the fine-tuned pipeline folder: what it was trained on and how.
PROVENANCE_FILE = "solidmark_finetune.json"

#: The keyed fine-tune's settings are ``diffmem train``'s (defaults: the SolidMark SD script's, batch 16).
FinetuneConfig = TrainConfig


def finetune_keyed(
    model: str | os.PathLike | None,
    data: str | os.PathLike,
    workdir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    config: TrainConfig | None = None,
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

    config = config or TrainConfig()
    config.check()
    manifest_path = Path(manifest) if manifest is not None else Path(data) / MANIFEST_NAME
    key_manifest, items = load_score_items(data, manifest_path)
    sizes = {it.image.shape for it in items}
    if len(sizes) > 1:
        raise ValueError(f"--data {data}: keyed images of several sizes {sorted(sizes)}; key it with --size")
    ids = [it.id for it in items]
    training = TrainingData(
        np.stack([it.image for it in items]), [it.caption for it in items], ids, ids, str(data)
    )
    key = {k: v for k, v in key_manifest.to_dict().items() if k != "images"}
    result = train_text_to_image(
        model,
        training,
        workdir,
        config,
        out=out,
        progress=progress,
        until_step=until_step,
        provenance={"manifest": key},
    )
    if until_step is not None and until_step < config.steps:
        return result
    record = json.loads((result / TRAIN_RECORD).read_text(encoding="utf-8"))
    provenance = {
        "model": record["model"],
        "base_fingerprint": record["base_fingerprint"],
        "data": str(data),
        "manifest": key,
        "images": len(items),
        "config": config.to_dict(),
        "steps_done": record["run"]["steps"],
        "final_loss": record["run"]["final_loss"],
    }
    atomic_write_json(result / PROVENANCE_FILE, provenance)
    return result
