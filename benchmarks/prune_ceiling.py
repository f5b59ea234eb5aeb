"""How far can zeroing weights go on the model organism? Whole layer groups zeroed, replication and fidelity.

The bound behind the pruning row of ``dori_eval.py``: any subspace pruning of the FFN second linear
layers (Chavhan et al. 2024) removes a subset of what zeroing *all* of them removes, so the rate with
every FFN weight zeroed is the most FFN pruning can be expected to reach, and the caption fidelity
at that point shows what it costs. Other groups (each FFN layer alone, the cross-attention values,
keys and outputs, the self-attention outputs) show where the organism's memorization lives.

For each group: the memorization rate of the verbatim captions (mean SSIM over seeds to the training
image above the organism's threshold, the generators of ``dori_eval.py``) and caption fidelity on the
held-out captions (``weights/diffmem-caption-classifier``)::

    python benchmarks/prune_ceiling.py --out runs/prune_ceiling.json
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from diffusers import StableDiffusionPipeline

from diffmem.io import atomic_write_json
from diffmem.modelio import load_pipeline
from diffmem.organism.ceiling import replication_and_fidelity, zeroed_group_rows, zeroing_groups
from diffmem.organism.data import build_organism_data
from diffmem.organism.fidelity import load_caption_classifier
from diffmem.organism.recipe import recipe_of


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table: group, weights zeroed, memorization rate, held-out fidelity."""
    lines = [
        "| zeroed | weights | memorization rate | held-out fidelity: both (colour, shape) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        f = r["fidelity"]
        lines.append(
            f"| {r['group']} | {r['weights']} | {r['rate']:.2f} | {f['both']:.2f} ({f['colour']:.2f}, {f['shape']:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="organism folder (default: weights/diffmem-organism-v2)")
    ap.add_argument("--out", default="runs/prune_ceiling.json")
    ap.add_argument("--seeds", type=int, default=2, help="generations per verbatim caption")
    ap.add_argument("--fidelity-seeds", type=int, default=4, help="generations per held-out caption")
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, StableDiffusionPipeline, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    data = build_organism_data(recipe_of(args.model))
    targets = [
        (im.id, im.caption, torch.from_numpy(im.pixels).float().permute(2, 0, 1) / 255.0)
        for im in data.by_role("verbatim")
    ]
    classifier = load_caption_classifier()
    gen_kw = dict(num_inference_steps=args.gen_steps, guidance_scale=args.guidance_scale, output_type="pt")

    def measure() -> dict:
        heldout = data.captions("heldout")
        return replication_and_fidelity(
            pipe, targets, heldout, classifier, args.seeds, args.fidelity_seeds, **gen_kw
        )

    rows = []
    t_start = time.time()
    for row in zeroed_group_rows(pipe.unet, zeroing_groups(pipe.unet), measure):
        rows.append(row)
        f = row["fidelity"]
        print(
            f"{row['group']}: {row['weights']} weights, rate {row['rate']:.2f}, held-out fidelity both "
            f"{f['both']:.2f} (colour {f['colour']:.2f}, shape {f['shape']:.2f})",
            flush=True,
        )
    atomic_write_json(
        args.out,
        {
            "machine": f"{platform.machine()} cpu, {torch.get_num_threads()} threads",
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "seconds": time.time() - t_start,
            "settings": vars(args),
            "rows": rows,
        },
    )
    print(table(rows))


if __name__ == "__main__":
    main()
