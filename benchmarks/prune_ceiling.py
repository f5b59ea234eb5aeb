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
import statistics
import time

import torch

from diffmem.attack.dori import ssim_similarity
from diffmem.edits import WeightMask, applied
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_write_json
from diffmem.modelio import load_pipeline
from diffmem.organism.data import build_organism_data
from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier
from diffmem.organism.recipe import recipe_of
from diffmem.scores.replication import criterion
from diffmem.seeding import item_generator


def main() -> None:
    from diffusers import StableDiffusionPipeline
    from torch import nn

    rule = criterion("organism-mean")  # the Dori table's: mean SSIM over seeds >= 0.7

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
    heldout = data.captions("heldout")
    classifier = load_caption_classifier()
    gen_kw = dict(num_inference_steps=args.gen_steps, guidance_scale=args.guidance_scale, output_type="pt")

    @torch.no_grad()
    def measure() -> dict:
        sims = []
        for rid, cap, img in targets:
            gens = torch.cat(
                [
                    pipe(cap, generator=item_generator(s, "dori-gen", rid), **gen_kw).images
                    for s in range(args.seeds)
                ]
            )
            sims.append(statistics.fmean(float(x) for x in ssim_similarity(gens.float(), img)))
        images = torch.cat(
            [
                pipe(cap, generator=item_generator(s, "heldout", i), **gen_kw).images
                for i, cap in enumerate(heldout)
                for s in range(args.fidelity_seeds)
            ]
        )
        labels = [cap for cap in heldout for _ in range(args.fidelity_seeds)]
        return {
            "rate": float(rule.memorized(torch.tensor(sims)[:, None]).float().mean()),
            "ssim_mean": statistics.fmean(sims),
            "fidelity": caption_fidelity(classifier, images.float(), labels).as_dict(),
        }

    linear = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, nn.Linear)}
    ffn = [n for n in linear if n.endswith(".ff.net.2")]
    groups = {"nothing (unedited)": [], "every FFN second linear layer": ffn}
    groups.update({f"FFN {n.split('.transformer_blocks')[0]} alone": [n] for n in ffn})
    for suffix, label in [
        ("attn2.to_v", "every cross-attention value projection"),
        ("attn2.to_k", "every cross-attention key projection"),
        ("attn2.to_out.0", "every cross-attention output projection"),
        ("attn1.to_out.0", "every self-attention output projection"),
    ]:
        groups[label] = [n for n in linear if n.endswith(suffix)]

    rows = []
    t_start = time.time()
    for label, names in groups.items():
        mask = WeightMask(
            {n: torch.ones_like(linear[n].weight, dtype=torch.bool) for n in names},
            model_fingerprint(pipe.unet),
        )
        with applied(pipe.unet, mask):
            row = {"group": label, "layers": len(names), "weights": mask.num_pruned(), **measure()}
        rows.append(row)
        f = row["fidelity"]
        print(
            f"{label}: {row['weights']} weights, rate {row['rate']:.2f}, held-out fidelity both "
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
    print(
        "| zeroed | weights | memorization rate | held-out fidelity: both (colour, shape) |\n|---|---|---|---|"
    )
    for r in rows:
        f = r["fidelity"]
        print(
            f"| {r['group']} | {r['weights']} | {r['rate']:.2f} | {f['both']:.2f} ({f['colour']:.2f}, {f['shape']:.2f}) |"
        )


if __name__ == "__main__":
    main()
