"""Caption fidelity on the model organism: does a generation show the colour and the shape its caption names?

The organism's generic and held-out captions are all "a {colour} {shape}" over one vocabulary
(``COLOURS`` x ``SHAPES``), so whether an image fits its caption can be checked by a classifier,
the organism's stand-in for a CLIP score (no CLIP weights exist offline, and none know these
renderings). ``CaptionClassifier`` is a small CNN with a colour head and a shape head, trained on
fresh renderings of *every* pair (held-out pairs included: it is a measuring instrument, not the
model under test), each batch drawn from ``(seed, step)``.

Fidelity of a set of generations = the fraction whose predicted colour (shape) is the named one. A
mitigation keeps held-out quality when its fidelity stays near the unedited model's on the same
captions and seeds, which same-seed SSIM to the unedited model cannot tell: any fine-tuning moves
the sample a seed lands on, even when the new image fits its caption as well.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffmem.io import atomic_save_tensors, atomic_write_text, load_checked_safetensors
from diffmem.modelio import weights_dir
from diffmem.organism.data import COLOURS, SHAPES, caption_of, render_generic
from diffmem.organism.evaluate import autoencoder_round_trip
from diffmem.seeding import derive_seed, item_generator

_CAPTION = re.compile(r"^a (\w+) (\w+)$")

#: Folder of the trained classifier under ``weights/`` (made by ``diffmem organism classifier``).
CLASSIFIER_NAME = "diffmem-caption-classifier"
CLASSIFIER_FORMAT = "diffmem.caption_classifier/1"
_WEIGHTS_FILE = "model.safetensors"


def parse_caption(caption: str) -> tuple[int, int]:
    """``"a {colour} {shape}"`` -> (colour index, shape index); ``ValueError`` for any other caption."""
    m = _CAPTION.match(caption.strip())
    colours, shapes = list(COLOURS), list(SHAPES)
    if not m or m.group(1) not in colours or m.group(2) not in shapes:
        raise ValueError(
            f"caption {caption!r} is not 'a <colour> <shape>' with a colour of {', '.join(colours)} "
            f"and a shape of {', '.join(shapes)}"
        )
    return colours.index(m.group(1)), shapes.index(m.group(2))


class CaptionClassifier(nn.Module):
    """Images ``(B, 3, H, W)`` in [0, 1] -> (colour logits ``(B, 8)``, shape logits ``(B, 6)``)."""

    def __init__(self, width: int = 32, image_size: int | None = None):
        super().__init__()
        self.width = width
        self.image_size = image_size  # the size it was trained at; caption_fidelity checks it when set

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)
            )

        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width), block(4 * width, 4 * width)
        )
        self.colour = nn.Linear(4 * width, len(COLOURS))
        self.shape = nn.Linear(4 * width, len(SHAPES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(images * 2 - 1)
        h = h.amax(dim=(2, 3))  # global max: the shape may sit anywhere
        return self.colour(h), self.shape(h)


def render_batch(
    n: int, seed: int, step: int, size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` fresh generic renderings of random (colour, shape) pairs, all drawn from ``(seed, step)``."""
    g = item_generator(seed, "caption-classifier", step)
    colour = torch.randint(len(COLOURS), (n,), generator=g)
    shape = torch.randint(len(SHAPES), (n,), generator=g)
    names, shapes = list(COLOURS), list(SHAPES)
    images = np.stack(
        [
            render_generic(names[c], shapes[s], derive_seed(seed, "caption-classifier", step, j), size)
            for j, (c, s) in enumerate(zip(colour.tolist(), shape.tolist()))
        ]
    )
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, colour, shape


def train_caption_classifier(
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    size: int = 64,
    progress: bool = False,
) -> CaptionClassifier:
    """Train a :class:`CaptionClassifier` on fresh renderings (cross-entropy on both heads, AdamW, cosine lr)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model = CaptionClassifier(image_size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in tqdm(range(steps), desc="caption classifier", disable=not progress):
        x, c, s = render_batch(batch_size, seed, step, size)
        lc, ls = model(x)
        loss = nn.functional.cross_entropy(lc, c) + nn.functional.cross_entropy(ls, s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@dataclass(frozen=True)
class Fidelity:
    """Fraction of images whose colour / shape / both are the ones their captions name."""

    n: int
    colour: float
    shape: float
    both: float

    def as_dict(self) -> dict:
        return {"n": self.n, "colour": self.colour, "shape": self.shape, "both": self.both}


@torch.no_grad()
def caption_fidelity(
    classifier: CaptionClassifier, images: torch.Tensor, captions: Sequence[str]
) -> Fidelity:
    """Colour, shape and joint accuracy of ``images`` ``(B, 3, H, W)`` in [0, 1] against ``captions``."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (batch, 3, height, width), got shape {tuple(images.shape)}")
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    size = classifier.image_size
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        raise ValueError(
            f"the caption classifier reads {size}x{size} images, got {images.shape[-2]}x{images.shape[-1]}"
        )
    target = torch.tensor([parse_caption(c) for c in captions])
    lc, ls = classifier.eval()(images.float().clamp(0, 1))
    colour_ok = lc.argmax(1) == target[:, 0]
    shape_ok = ls.argmax(1) == target[:, 1]
    return Fidelity(
        len(images),
        float(colour_ok.float().mean()),
        float(shape_ok.float().mean()),
        float((colour_ok & shape_ok).float().mean()),
    )


# ------------------------------------------------------------------------------------------ files


def save_caption_classifier(
    model: CaptionClassifier, folder: str | os.PathLike, info: dict | None = None
) -> Path:
    """Write ``folder/model.safetensors`` (architecture and ``info`` in its metadata), atomically."""

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CLASSIFIER_FORMAT,
        "width": str(model.width),
        "image_size": str(model.image_size or ""),
        "info": json.dumps(info or {}),
    }
    return atomic_save_tensors(folder / _WEIGHTS_FILE, model.state_dict(), meta)


def load_caption_classifier(
    folder: str | os.PathLike | None = None, argument: str = "--classifier"
) -> CaptionClassifier:
    """The classifier saved by :func:`save_caption_classifier` (default: ``weights/diffmem-caption-classifier``).

    Loads safetensors only; a missing folder or a file of another kind raises an error naming ``argument``.
    """

    folder = Path(folder) if folder is not None else weights_dir() / CLASSIFIER_NAME
    state, meta = load_checked_safetensors(
        folder / _WEIGHTS_FILE,
        format=CLASSIFIER_FORMAT,
        what="a diffmem caption classifier",
        argument=argument,
        missing_hint=f"make it with: diffmem organism classifier --out {folder}",
    )
    model = CaptionClassifier(int(meta["width"]), int(meta["image_size"]) if meta.get("image_size") else None)
    model.load_state_dict(state)
    return model.eval()


def build_caption_classifier(
    out: str | os.PathLike,
    *,
    steps: int = 1500,
    seed: int = 0,
    size: int = 64,
    num_test: int = 1024,
    vae=None,
    progress: bool = True,
) -> dict:
    """Train the classifier, measure it on ``num_test`` renderings of another seed, save it with a card.

    With an ``AutoencoderKL`` given, it is also measured on the autoencoder's reconstructions of those
    renderings (what a generation of a perfect diffusion model would look like). Returns the metrics.
    """

    model = train_caption_classifier(steps=steps, seed=seed, size=size, progress=progress)
    x, c, s = render_batch(num_test, seed=seed + 1, step=0, size=size)
    names, shapes = list(COLOURS), list(SHAPES)
    captions = [caption_of(names[i], shapes[j]) for i, j in zip(c.tolist(), s.tolist())]
    metrics = {
        "steps": steps,
        "seed": seed,
        "image_size": size,
        "test_seed": seed + 1,
        "fresh_renderings": caption_fidelity(model, x, captions).as_dict(),
    }
    if vae is not None:
        recon = torch.cat([autoencoder_round_trip(vae, x[k : k + 64]) for k in range(0, len(x), 64)])
        metrics["autoencoder_reconstructions"] = caption_fidelity(model, recon, captions).as_dict()
    save_caption_classifier(model, out, metrics)
    atomic_write_text(Path(out) / "README.md", classifier_card(metrics, out))
    return metrics


def classifier_card(metrics: dict, out: str | os.PathLike = f"weights/{CLASSIFIER_NAME}") -> str:
    """Markdown model card of the caption classifier, from the metrics of :func:`build_caption_classifier`."""

    def row(name: str, key: str) -> str:
        f = metrics.get(key)
        if not f:
            return f"| {name} | not measured | | |"
        return f"| {name} ({f['n']} images) | {f['colour']:.1%} | {f['shape']:.1%} | {f['both']:.1%} |"

    return f"""---
license: apache-2.0
library_name: pytorch
tags: [image-classification, evaluation, model-organism, diffmem]
---

# diffmem-caption-classifier

The measuring instrument for **caption fidelity** on diffmem's model organism
(`weights/diffmem-organism-v2`): does a generation for "a {{colour}} {{shape}}" show that colour and that
shape? A small CNN (4 conv blocks of width 32-128, GroupNorm, SiLU, max-pool; global max pooling; a
colour head over {len(COLOURS)} colours and a shape head over {len(SHAPES)} shapes; {metrics["image_size"]} px
RGB in [0, 1]). It stands in for a CLIP score, which has no offline weights that know these renderings.

## Training

Trained by `diffmem organism classifier --out {out} --steps {metrics["steps"]}
--seed {metrics["seed"]}` on fresh renderings of **every** colour x shape pair (the held-out pairs
included: it measures the organism, it is not the model under test), {metrics["steps"]} steps of 64
images, each batch drawn from (seed, step) by `diffmem.organism.data.render_generic`; cross-entropy on
both heads, AdamW (lr 2e-3, weight decay 1e-4), one-cycle schedule. About 5 min on 2 CPU cores,
measurements included. Training is seeded: on 2026-12-01 the command gave weights bit-identical to the
classifier behind the caption-fidelity numbers in `benchmarks/RESULTS.md`.

## Measured (renderings of seed {metrics["test_seed"]}, never seen in training)

| input | colour right | shape right | both right |
|---|---|---|---|
{row("fresh renderings", "fresh_renderings")}
{row("the organism's autoencoder reconstructions of them", "autoencoder_reconstructions")}

## Use

```python
from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier

classifier = load_caption_classifier()  # this folder
fidelity = caption_fidelity(classifier, images, captions)  # images (B, 3, 64, 64) in [0, 1]
print(fidelity.colour, fidelity.shape, fidelity.both)
```

`benchmarks/dori_eval.py` reads it for the held-out quality columns of the pruning / Dori /
adversarial fine-tuning table. Weights: `model.safetensors` (architecture and these metrics in its
metadata); no pickle.

## Limits

It reads only the organism's generic vocabulary ("a {{colour}} {{shape}}" over the colours and shapes
above) and {metrics["image_size"]} px images; any other caption or size is refused with an error. It
says nothing about the organism's photographs or about image quality beyond colour and shape.
"""
