"""How low can NeMo's memorization criterion go on a model? (the floor behind docs/nemo.md)

For each verbatim caption of the organism, with NeMo's 10 latents (seed 1) and its first-step noise
differences ``delta_s`` (min-max normalised, MS-SSIM as in ``diffmem.localize.nemo``):

* ``all off``: ``mem(S)`` with every value neuron of the searched blocks switched off;
* ``empty``: the largest same-seed similarity between the caption's ``delta_s`` and the empty
  prompt's (no text at all), the lowest any set of neurons could plausibly reach.

Then the same-seed similarity of generic captions to the empty prompt, against their cross-seed
score (what the threshold is calibrated on). Without ``--threshold``, tau is calibrated first (mean + 1
std of the detection score over the model's generic captions, as ``benchmarks/nemo_eval.py``); with
``--legacy-similarity`` all of it uses diffmem's MS-SSIM before 2026-12-06. ~30 s on 2 CPU cores::

    .venv/bin/python benchmarks/nemo_floor.py [--model weights/diffmem-organism-v2] [--threshold T]

The verbatim captions are those of the model's recipe (``diffmem_organism.json``), with copy counts.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from diffmem.evaluate.sd_likeness import nemo_floors
from diffmem.localize.nemo import LEGACY_SIMILARITY, NeMo, NemoConfig
from diffmem.organism.data import build_organism_data
from diffmem.organism.recipe import recipe_of

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GENERIC = ("a red circle", "a blue square", "a green triangle", "a yellow star")


def calibrated_threshold(nemo: NeMo, generic) -> float:
    """NeMo's tau on the model's generic captions (mean + 1 std of the detection score), printed."""
    found = nemo.threshold_calibration(generic)
    print(
        f"tau = {found['mean']:.3f} + {found['std']:.3f} = {found['threshold']:.3f} "
        f"(mean + 1 std over {found['prompts']} generic captions)\n"
    )
    return found["threshold"]


def verbatim_table(nemo: NeMo, verbatim, floors, empty, blocks: str) -> None:
    """One row per verbatim caption (fewest copies first): detection score, ``mem(S)`` with every searched
    neuron off, and the empty-prompt floor (``floors``, in the same order) with the median beside it."""
    print(f"| verbatim caption | copies | detection | all {blocks} off: mem | empty prompt: max / median |")
    print("|---|---|---|---|---|")
    for image, floor in zip(verbatim, floors):
        probe = nemo.probe(image.caption)
        all_off = probe.evaluate(torch.ones(probe.n_neurons, dtype=torch.bool))["mem"]
        all_off = f"{all_off:.3f}" if probe.memorized else "not detected"  # mem(S) is for detected prompts
        median = probe.similarity(empty, probe.base).median()  # all 10 seeds in one comparison
        print(
            f"| {image.caption[:48]} | {image.copies} | {probe.score:.3f} | {all_off} | {floor:.3f} / {median:.3f} |"
        )


def generic_table(nemo: NeMo, empty) -> None:
    """Generic captions: cross-seed score against same-seed similarity to the empty prompt."""
    print("| generic caption | cross-seed score | same seed vs empty prompt: max / median |")
    print("|---|---|---|")
    for caption in GENERIC:
        probe = nemo.probe(caption)
        sim = probe.similarity(probe.base, empty)
        print(f"| {caption} | {probe.score:.3f} | {sim.max():.3f} / {sim.median():.3f} |")


def main(argv=None) -> int:
    from diffusers import StableDiffusionPipeline

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "weights" / "diffmem-organism-v2"))
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="NeMo's tau for this model (default: calibrated here, mean + 1 std over its generic captions)",
    )
    p.add_argument("--blocks", default="down,mid")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--legacy-similarity",
        action="store_true",
        help="diffmem's MS-SSIM before 2026-12-06 (data range 1, padded border) instead of NeMo's code's",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None)
    legacy = LEGACY_SIMILARITY if args.legacy_similarity else {}
    config = NemoConfig(blocks=tuple(args.blocks.split(",")), **legacy)
    data = build_organism_data(recipe_of(args.model))
    tau = args.threshold
    if tau is None:
        tau = calibrated_threshold(NeMo.from_pipe(pipe, None, config), data.captions("generic"))
    nemo = NeMo.from_pipe(pipe, None, replace(config, threshold=tau))
    verbatim = sorted(data.by_role("verbatim"), key=lambda im: im.copies)
    floors = nemo_floors(pipe, (), [im.caption for im in verbatim], config=config, threshold=tau)["floors"]
    empty = nemo.probe("").base
    verbatim_table(nemo, verbatim, floors, empty, args.blocks)
    above = sum(f > tau for f in floors)
    print(
        f"\nempty-prompt floor: {min(floors):.3f}-{max(floors):.3f}, mean {sum(floors) / len(floors):.3f}; "
        f"above tau {tau:.3f} for {above}/{len(floors)}\n"
    )
    generic_table(nemo, empty)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
