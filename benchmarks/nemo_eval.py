"""NeMo on the model organism: localize each memorized caption's neurons, switch them off, measure.

Steps (all seeds from the organism recipe; generation j of a caption starts from
``item_generator(recipe.seed, caption, j)`` as in ``diffmem.organism.evaluate``):

1. Value statistics and NeMo's threshold (mean + 1 std of the detection score) on the organism's
   generic captions (the non-memorized reference set).
2. ``NeMo.localize`` for every verbatim and template caption (one NeuronSet each, resumable).
3. Replication (own training image at SSIM >= the organism's replication threshold) and Wen et al.'s
   score over ``--seeds`` generations, before and with the caption's neurons off (weights scaled to 0).
4. The union of all found neurons off: held-out captions' images against the unedited ones (SSIM,
   median), and verbatim replication; the same with random neurons (same count per layer, seeded).
5. The guarded pipeline's mitigations (``"nemo"`` with the union, ``"embedding"``) on verbatim and
   held-out captions: replication, score, seconds added per flagged and per unflagged prompt.

    .venv/bin/python benchmarks/nemo_eval.py [--model weights/diffmem-organism-v2] [--seeds 10]

Writes ``benchmarks/results/nemo_eval/results.json`` (+ ``neurons/``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "weights/diffmem-organism-v2"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--limit", type=int, default=None, help="at most N captions per role")
    parser.add_argument(
        "--min-copies",
        type=int,
        default=None,
        help="only verbatim captions whose image has at least N training copies (graded organisms, v3)",
    )
    parser.add_argument("--mask-batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/nemo_eval"))
    parser.add_argument("--skip-pipeline", action="store_true", help="skip step 5")
    parser.add_argument(
        "--blocks", default="down,mid", help="UNet parts searched: down,mid (NeMo's default) or down,mid,up"
    )
    parser.add_argument(
        "--early-exit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stop with no neurons when every searched neuron off leaves the prompt memorized (a heuristic; "
        "default off: NeMo's fallback, the schedule runs and refines against the score reached)",
    )
    parser.add_argument(
        "--legacy-similarity",
        action="store_true",
        help="diffmem's MS-SSIM before 2026-12-06 (data range 1, padded border) instead of NeMo's code's",
    )
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(max(1, args.threads))

    from diffmem.evaluate.edit_replication import EditReplication
    from diffmem.evaluate.localization import localize_prompts, random_control
    from diffmem.fingerprint import model_fingerprint
    from diffmem.guard.auto import load_guarded
    from diffmem.io import atomic_write_json
    from diffmem.localize.nemo import LEGACY_SIMILARITY, NemoConfig
    from diffmem.modelio import check_sd_folder
    from diffmem.organism.data import build_organism_data
    from diffmem.organism.recipe import recipe_of
    from diffmem.organism.replication import TrainingImages

    check_sd_folder(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = recipe_of(args.model)
    steps = args.steps or recipe.num_inference_steps
    guidance, seed, seeds = recipe.guidance_scale, recipe.seed, args.seeds
    pipe = load_guarded(args.model)
    pipe.set_progress_bar_config(disable=True)
    data = build_organism_data(recipe)
    training = TrainingImages.from_data(data)
    roles = {r: data.captions(r) for r in ("template", "heldout", "generic")}
    roles["verbatim"] = [im.caption for im in data.by_role("verbatim", args.min_copies)]
    roles = {r: cs[: args.limit] for r, cs in roles.items()}
    blocks = tuple(b.strip() for b in args.blocks.split(",") if b.strip())
    t0 = time.perf_counter()

    # 1-2. statistics and threshold on the generic (non-memorized) captions, then one NeuronSet per
    # verbatim / template caption (resumable: every stage is cached in --out)
    ids = {
        f"{role}-{i:03d}": (role, c) for role in ("verbatim", "template") for i, c in enumerate(roles[role])
    }
    run = localize_prompts(
        pipe,
        [(k, c) for k, (_, c) in ids.items()],
        data.captions("generic"),
        config=NemoConfig(
            mask_batch=args.mask_batch,
            blocks=blocks,
            early_exit=args.early_exit,
            **(LEGACY_SIMILARITY if args.legacy_similarity else {}),
        ),
        cache_dir=out,
        progress=True,
    )
    tau = run.threshold
    sets = {ids[k][1]: ns for k, ns in run.sets.items()}
    print(f"NeMo threshold {tau:.3f} (mean + 1 std over the generic captions)", flush=True)

    # 3. replication before / after, per caption (its own neurons off)
    ev = EditReplication(
        pipe, training, num_gens=seeds, num_inference_steps=steps, guidance_scale=guidance, seed=seed
    )
    per_caption = []
    for role in ("verbatim", "template"):
        captions = roles[role]
        rows = ev.per_caption([(c, role, sets[c]) for c in captions])
        for row in rows:
            ns = sets[row["caption"]]
            row.update(
                memorized_by_nemo=ns.info["memorized"],
                neurons=len(ns),
                nemo_score_before=ns.score_before[0],
                nemo_score_after=ns.score_after[0],
                nemo_detection_after=ns.info.get("detection_after"),
                localize_seconds=ns.info["seconds"],
            )
        per_caption += rows

    # Wen first-step threshold for flagging: balanced-accuracy optimum, verbatim vs generic captions
    # (the generic captions' first-step scores on the same 'steps' schedule as the verbatim ones: the
    # first timestep, hence the score's scale, depends on the number of steps)
    from diffmem.detect import calibrate, score_prompts

    gen_first = score_prompts(
        pipe,
        roles["generic"],
        num_gens=2,
        window=(0, 1),
        num_inference_steps=steps,
        guidance_scale=guidance,
        seed=seed,
        progress=False,
    )
    gen_first = gen_first.mean(dim=1).tolist()
    verb_first = [r["wen_first_before"] for r in per_caption if r["role"] == "verbatim"]
    wen = calibrate(verb_first + gen_first, [1] * len(verb_first) + [0] * len(gen_first))
    wen_tau = wen.threshold

    # 4. union of all neurons off; random control with the same count per layer
    union = run.union
    held = roles["heldout"]
    controls = {"union": union, "random": random_control(union, pipe.unet, seed=0)}
    summary_sets = ev.edit_vs_control(controls, held, roles["verbatim"])

    # 5. the guarded pipeline's mitigations
    pipeline_rows = {}
    if not args.skip_pipeline:
        modes = {
            "none": {},
            "nemo": {
                "mitigation": "nemo",
                "mitigation_options": {"neuron_set": union},
                "memorization_threshold": wen_tau,
            },
            "embedding": {"mitigation": "embedding", "memorization_threshold": wen_tau},
        }
        pipeline_rows = ev.pipeline_modes(modes, roles["verbatim"], held)

    verb = [r for r in per_caption if r["role"] == "verbatim"]
    tmpl = [r for r in per_caption if r["role"] == "template"]

    from diffmem.scores.replication import criterion

    replicating, mitigated_rule = criterion("organism-half"), criterion("nemo-success")

    def role_summary(rows):
        mem = [r for r in rows if r["memorized_by_nemo"]]
        ok = [
            r
            for r in rows
            if not mitigated_rule.memorized_count(r["replicated_after"], seeds)
            and r["nemo_score_after"] <= tau
        ]
        counts = [r["neurons"] for r in mem]
        return {
            "captions": len(rows),
            "memorized_by_nemo": len(mem),
            f"replicating_before ({replicating.describe()})": sum(
                replicating.memorized_count(r["replicated_before"], seeds) for r in rows
            ),
            f"success (not memorized at {mitigated_rule.describe()}, score <= tau)": len(ok),
            "success_rate": len(ok) / len(rows) if rows else None,
            "neurons_median": _median(counts),
            "neurons_max": max(counts) if counts else None,
            "replicated_before_mean": statistics.mean(r["replicated_before"] for r in rows) if rows else None,
            "replicated_after_mean": statistics.mean(r["replicated_after"] for r in rows) if rows else None,
            "localize_seconds_mean": statistics.mean(r["localize_seconds"] for r in rows) if rows else None,
        }

    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": args.model,
        "fingerprint": model_fingerprint(pipe.unet),
        "seeds": seeds,
        "steps": steps,
        "guidance": guidance,
        "nemo_threshold": tau,
        "wen_first_step_threshold": wen_tau,
        "wen_first_step_detection": wen.to_dict(),
        "verbatim": role_summary(verb),
        "template": role_summary(tmpl),
        "union_and_control": summary_sets,
        "pipeline": pipeline_rows,
        "captions": per_caption,
        "seconds_total": time.perf_counter() - t0,
    }
    atomic_write_json(out / "results.json", results)
    print(json.dumps({k: results[k] for k in ("verbatim", "template", "union_and_control")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
