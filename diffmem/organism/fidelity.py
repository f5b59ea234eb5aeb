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

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffmem.organism.data import COLOURS, SHAPES, render_generic
from diffmem.seeding import derive_seed, item_generator

_CAPTION = re.compile(r"^a (\w+) (\w+)$")


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

    def __init__(self, width: int = 32):
        super().__init__()

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
    model = CaptionClassifier()
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
