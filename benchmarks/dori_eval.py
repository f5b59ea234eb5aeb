"""Evaluation on the model organism: no mitigation / NeMo / subspace pruning / adversarial fine-tuning, each attacked by Dori.

A table like the Finding Dori paper's: for the organism's verbatim-memorized photographs, the SSIM of
generations to the training image (mean ± std over targets; per target the mean over seeds) and the
memorization rate (fraction of targets whose mean SSIM exceeds ``--threshold``), from the caption and
from the Dori trigger; held-out quality as the median SSIM of held-out-caption generations to the
unedited model's (same seeds) and as caption fidelity (the fraction whose colour and shape a
classifier, ``diffmem.organism.fidelity``, reads as the ones named); the false-positive control (the
attack on images the model never saw).

Stages are cached as JSON in ``--out`` (rerun to resume after an interruption):

    python benchmarks/dori_eval.py --model weights/diffmem-organism-v2 --out runs/dori_eval
    python benchmarks/dori_eval.py --quick ...     # fewer targets and seeds, shorter fine-tuning

It prints the markdown table for benchmarks/RESULTS.md and writes it to ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from diffmem.io import atomic_write_json, atomic_write_text


def _image_tensor(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).float().permute(2, 0, 1) / 255.0


def main() -> None:
    from diffusers import StableDiffusionPipeline

    from diffmem.attack.dori import DoriConfig
    from diffmem.edits import NeuronSet
    from diffmem.evaluate.localization import localize_prompts
    from diffmem.evaluate.robustness import RobustnessEvaluation, RobustnessSettings, Target
    from diffmem.modelio import load_pipeline
    from diffmem.organism.data import build_organism_data, generic_and_heldout_pairs, render_generic
    from diffmem.organism.fidelity import load_caption_classifier
    from diffmem.organism.recipe import OrganismRecipe, recipe_of
    from diffmem.scores.replication import PRESETS, ReplicationCriterion
    from diffmem.seeding import derive_seed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="organism folder (default: weights/diffmem-organism-v2)")
    ap.add_argument(
        "--recipe",
        default=None,
        help="recipe.json of the organism's data (default: the one the model folder records, else v2's)",
    )
    ap.add_argument("--out", default="runs/dori_eval")
    ap.add_argument("--targets", type=int, default=16, help="verbatim targets (default: all 16)")
    ap.add_argument(
        "--min-copies",
        type=int,
        default=None,
        help="only verbatim targets with at least N training copies (graded organisms, v3)",
    )
    ap.add_argument("--controls", type=int, default=8, help="non-memorized control images")
    ap.add_argument("--heldout", type=int, default=8, help="held-out captions for the quality check")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument(
        "--fidelity-captions", type=int, default=16, help="held-out captions for caption fidelity (all 16)"
    )
    ap.add_argument("--fidelity-seeds", type=int, default=4, help="seeds per caption for caption fidelity")
    ap.add_argument(
        "--classifier",
        default=None,
        help="caption classifier folder (default: weights/diffmem-caption-classifier)",
    )
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--attack-steps", type=int, default=50)
    ap.add_argument("--attack-batch", type=int, default=8)
    ap.add_argument(
        "--threshold",
        type=float,
        default=PRESETS["organism-mean"].threshold,
        help='replication: mean SSIM over seeds >= this (default 0.7, PRESETS["organism-mean"])',
    )
    ap.add_argument(
        "--ratios", default="0.01,0.02,0.05,0.1", help="pruning ratios rho to try (first = paper default)"
    )
    ap.add_argument("--tau", type=int, default=10)
    ap.add_argument(
        "--cond-only", action="store_true", help="pruning statistics from the conditional half only"
    )
    ap.add_argument(
        "--reference",
        choices=("empty", "generic"),
        default="empty",
        help="reference prompts for pruning: the empty prompt (paper) or generic training captions",
    )
    ap.add_argument("--prune-steps", type=int, default=50)
    ap.add_argument(
        "--max-heldout-drop",
        type=float,
        default=0.5,
        help="pick a ratio whose held-out median SSIM stays above this",
    )
    ap.add_argument(
        "--neurons", default=None, help="NeuronSet for the NeMo row (default: localize with NeMo here)"
    )
    ap.add_argument(
        "--nemo-sets",
        default=None,
        help="folder of per-target NeuronSets (matched by caption) for the per-target NeMo rows "
        "(default: the ones localized here, OUT/nemo_neurons/)",
    )
    ap.add_argument("--no-nemo", action="store_true")
    ap.add_argument("--finetune-rounds", type=int, default=3)
    ap.add_argument("--finetune-lr", type=float, default=1e-4)
    ap.add_argument("--retain", type=int, default=64, help="generic training images used as retain data")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument(
        "--no-attack",
        action="store_true",
        help="only captions: no mitigation vs the pruning sweep (no Dori, no FT)",
    )
    ap.add_argument("--quick", action="store_true", help="8 targets, 4 controls, 2 seeds, 2 rounds")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.quick:
        args.targets, args.controls, args.heldout, args.seeds = 8, 4, 4, 2
        args.finetune_rounds = min(args.finetune_rounds, 2)

    t_start = time.time()
    out = Path(args.out)
    recipe = (
        OrganismRecipe.from_dict(json.loads(Path(args.recipe).read_text()))
        if args.recipe
        else recipe_of(args.model)
    )
    data = build_organism_data(recipe)
    verbatim = data.by_role("verbatim", args.min_copies)
    targets = [Target(im.id, im.caption, _image_tensor(im.pixels)) for im in verbatim[: args.targets]]
    _, held_pairs = generic_and_heldout_pairs()
    controls = [
        Target(
            f"control-{c}-{s}",
            f"a {c} {s}",
            _image_tensor(
                render_generic(c, s, derive_seed(recipe.seed, "dori-control", c, s), recipe.image_size)
            ),
        )
        for c, s in held_pairs[: args.controls]
    ]
    pipe = load_pipeline(args.model, StableDiffusionPipeline, device=args.device)
    pipe.set_progress_bar_config(disable=True)
    settings = RobustnessSettings(
        seeds=args.seeds,
        num_inference_steps=args.gen_steps,
        guidance_scale=args.guidance_scale,
        criterion=ReplicationCriterion(args.threshold, "mean"),
        dori=DoriConfig(steps=args.attack_steps, batch_size=args.attack_batch),
    )
    fidelity_sets = {
        "held-out captions": data.captions("heldout")[: args.fidelity_captions],
        "training captions": data.captions("generic")[: args.fidelity_captions],
    }
    ev = RobustnessEvaluation(
        pipe,
        targets,
        out,
        heldout_captions=data.captions("heldout")[: args.heldout],
        settings=settings,
        fidelity=(load_caption_classifier(args.classifier), fidelity_sets, args.fidelity_seeds),
    )

    def write_table() -> None:
        header = (
            f"Model organism ({args.model or 'weights/diffmem-organism-v2'}), {len(targets)} verbatim targets, "
            f"{len(controls)} non-memorized controls, {args.seeds} seeds, {args.gen_steps} DDIM steps, guidance "
            f"{args.guidance_scale}; Dori: {settings.dori.steps} Adam steps, lr {settings.dori.lr}, batch "
            f"{settings.dori.batch_size}; replication: {settings.criterion.describe()}. Machine: {platform.machine()} "
            f"({args.device}), {time.strftime('%Y-%m-%d', time.gmtime())}, {(time.time() - t_start) / 60:.1f} min "
            f"for this run (cached stages excluded). Caption fidelity: {args.fidelity_seeds} seeds per caption, "
            f"the caption classifier `{args.classifier or 'weights/diffmem-caption-classifier'}`."
        )
        text = ev.markdown(header)
        atomic_write_text(out / "table.md", text)
        atomic_write_json(out / "table.json", ev.rows)
        print(text)

    ev.add_setting("Memorized captions, no mitigation", "none", attack=not args.no_attack)
    write_table()
    mask = ev.pruning_sweep(
        [float(r) for r in args.ratios.split(",")],
        tau=args.tau,
        reference=None
        if args.reference == "empty"
        else (data.captions("generic") * len(targets))[: len(targets)],
        num_inference_steps=args.prune_steps,
        cond_only=args.cond_only,
        min_heldout=args.max_heldout_drop,
    )
    mask.save(out / "weight_mask.safetensors")
    if args.no_attack:  # pruning alone: the cheapest measurement, for slow machines
        write_table()
        return
    ev.add_setting(
        f"Pruning rho={mask.params['ratio']}",
        "prune_attack",
        edit=mask,
        key=mask.to_dict(),
        caption_row=False,
    )
    ev.add_setting(
        "Non-memorized images, their captions (false-positive control)",
        "controls",
        items=controls,
        quality=False,
    )
    write_table()

    nemo_set = None
    if not args.no_nemo:
        per_target = {}
        if args.neurons:
            nemo_set = NeuronSet.load(args.neurons)
        else:
            nonmem = data.captions("generic") + data.captions("heldout")
            run = localize_prompts(
                pipe,
                [(t.id, t.caption) for t in targets],
                nonmem,
                calibration_prompts=16,
                cache_dir=out / "nemo",
            )
            nemo_set, per_target = run.union, run.sets
        if args.nemo_sets:
            loaded = [NeuronSet.load(f) for f in sorted(Path(args.nemo_sets).glob("*.json"))]
            by_caption = {p: one for one in loaded for p in one.prompts}
            per_target = {t.id: by_caption[t.caption] for t in targets if t.caption in by_caption}
        ev.add_setting(f"NeMo ({len(nemo_set)} neurons)", "nemo", edit=nemo_set, key=nemo_set.to_dict())
        if len(per_target) == len(targets):
            sizes = [len(per_target[t.id]) for t in targets]
            ev.add_setting(
                f"NeMo per target (its own {min(sizes)}-{max(sizes)} neurons)",
                "nemo_per_target",
                per_item_edits=per_target,
                key={i: e.to_dict() for i, e in per_target.items()},
            )
        else:
            ev.note(
                f"NeMo per target: NeuronSets for {len(per_target)} of {len(targets)} targets, not measured"
            )
        write_table()

    if not args.no_finetune:
        generic = data.by_role("generic")
        pick = torch.randperm(len(generic), generator=torch.Generator().manual_seed(0))[
            : args.retain
        ].tolist()
        retain = [Target(generic[i].id, generic[i].caption, _image_tensor(generic[i].pixels)) for i in pick]
        ev.adversarial_finetune(
            nemo_set if nemo_set is not None else mask,
            retain,
            rounds=args.finetune_rounds,
            lr=args.finetune_lr,
        )
    write_table()


if __name__ == "__main__":
    main()
