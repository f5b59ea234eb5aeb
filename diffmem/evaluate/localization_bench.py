"""``localization``: NeMo on the model organism: localize each memorized caption's neurons, switch them off, measure.

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
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

from diffmem.detect import calibrate, score_prompts
from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.evaluate.edit_replication import EditReplication
from diffmem.evaluate.localization import localize_prompts, random_control
from diffmem.fingerprint import model_fingerprint
from diffmem.localize.nemo import LEGACY_SIMILARITY, NemoConfig
from diffmem.modelio import default_model
from diffmem.organism.data import build_organism_data
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import TrainingImages
from diffmem.scores.replication import criterion

__all__ = ["LocalizationBench", "nemo_role_summary"]


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def nemo_role_summary(rows: Sequence[dict], seeds: int, tau: float) -> dict[str, Any]:
    """Per caption role: how many captions NeMo calls memorized, replicate before, and are mitigated
    (not memorized at ``nemo-success`` with the neurons off and NeMo's score <= ``tau``)."""
    replicating, mitigated_rule = criterion("organism-half"), criterion("nemo-success")
    mem = [r for r in rows if r["memorized_by_nemo"]]
    ok = [
        r
        for r in rows
        if not mitigated_rule.memorized_count(r["replicated_after"], seeds) and r["nemo_score_after"] <= tau
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


@register_evaluation
class LocalizationBench(Evaluation):
    name = "localization"
    help = "NeMo on the organism: each memorized caption's neurons found, switched off, replication measured"
    default_out = "benchmarks/results/nemo_eval"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--seeds", type=int, default=10)
        add("--steps", type=int, default=None, help="default: the recipe's")
        add("--limit", type=int, default=None, help="at most N captions per role")
        add(
            "--min-copies",
            type=int,
            default=None,
            help="only verbatim captions whose image has at least N training copies (graded organisms, v3)",
        )
        add("--mask-batch", type=int, default=None, help="default: 8 on CUDA, 1 on CPU")
        add("--skip-pipeline", action="store_true", help="skip step 5")
        add(
            "--blocks",
            default="down,mid",
            help="UNet parts searched: down,mid (NeMo's default) or down,mid,up",
        )
        add(
            "--early-exit",
            action=argparse.BooleanOptionalAction,
            default=False,
            help="stop with no neurons when every searched neuron off leaves the prompt memorized (a heuristic; "
            "default off: NeMo's fallback, the schedule runs and refines against the score reached)",
        )
        add(
            "--legacy-similarity",
            action="store_true",
            help="diffmem's MS-SSIM before 2026-12-06 (data range 1, padded border) instead of NeMo's code's",
        )

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        args = self.args
        pipe = load_model()
        model = args.model or default_model()
        recipe = recipe_of(model)
        steps, seeds = args.steps or recipe.num_inference_steps, args.seeds
        data = build_organism_data(recipe)
        roles = {r: data.captions(r) for r in ("template", "heldout", "generic")}
        roles["verbatim"] = [im.caption for im in data.by_role("verbatim", args.min_copies)]
        roles = {r: cs[: args.limit] for r, cs in roles.items()}
        t0 = time.perf_counter()

        # 1-2. statistics and threshold on the generic (non-memorized) captions, then one NeuronSet per
        # verbatim / template caption (resumable: every stage is cached in --out)
        ids = {
            f"{role}-{i:03d}": (role, c)
            for role in ("verbatim", "template")
            for i, c in enumerate(roles[role])
        }
        config = NemoConfig(
            mask_batch=args.mask_batch,
            blocks=tuple(b.strip() for b in args.blocks.split(",") if b.strip()),
            early_exit=args.early_exit,
            **(LEGACY_SIMILARITY if args.legacy_similarity else {}),
        )
        progress = not args.no_progress
        run = localize_prompts(
            pipe,
            [(k, c) for k, (_, c) in ids.items()],
            data.captions("generic"),  # the whole non-memorized reference set, whatever --limit
            config=config,
            cache_dir=args.out,
            progress=progress,
        )
        tau = run.threshold
        sets = {ids[k][1]: ns for k, ns in run.sets.items()}
        print(f"NeMo threshold {tau:.3f} (mean + 1 std over the generic captions)", flush=True)

        # 3. replication before / after, per caption (its own neurons off)
        ev = EditReplication(
            pipe,
            TrainingImages.from_data(data),
            num_gens=seeds,
            num_inference_steps=steps,
            guidance_scale=recipe.guidance_scale,
            seed=recipe.seed,
        )
        per_caption = []
        for role in ("verbatim", "template"):
            rows = ev.per_caption([(c, role, sets[c]) for c in roles[role]])
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
        # (the generic captions' first-step scores on the same schedule as the verbatim ones: the first
        # timestep, hence the score's scale, depends on the number of steps)
        generic_first = score_prompts(
            pipe,
            roles["generic"],
            num_gens=2,
            window=(0, 1),
            num_inference_steps=steps,
            guidance_scale=recipe.guidance_scale,
            seed=recipe.seed,
            progress=False,
        )
        generic_first = generic_first.mean(dim=1).tolist()
        verbatim_first = [r["wen_first_before"] for r in per_caption if r["role"] == "verbatim"]
        wen = calibrate(verbatim_first + generic_first, [1] * len(verbatim_first) + [0] * len(generic_first))

        # 4. union of all neurons off; random control with the same count per layer
        controls = {"union": run.union, "random": random_control(run.union, pipe.unet, seed=0)}
        union_and_control = ev.edit_vs_control(controls, roles["heldout"], roles["verbatim"])

        # 5. the guarded pipeline's mitigations
        pipeline_rows = {}
        if not args.skip_pipeline:
            modes = {
                "none": {},
                "nemo": {
                    "mitigation": "nemo",
                    "mitigation_options": {"neuron_set": run.union},
                    "memorization_threshold": wen.threshold,
                },
                "embedding": {"mitigation": "embedding", "memorization_threshold": wen.threshold},
            }
            pipeline_rows = ev.pipeline_modes(modes, roles["verbatim"], roles["heldout"])

        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": model,
            "fingerprint": model_fingerprint(pipe.unet),
            "seeds": seeds,
            "steps": steps,
            "guidance": recipe.guidance_scale,
            "nemo_threshold": tau,
            "wen_first_step_threshold": wen.threshold,
            "wen_first_step_detection": wen.to_dict(),
            "verbatim": nemo_role_summary([r for r in per_caption if r["role"] == "verbatim"], seeds, tau),
            "template": nemo_role_summary([r for r in per_caption if r["role"] == "template"], seeds, tau),
            "union_and_control": union_and_control,
            "pipeline": pipeline_rows,
            "captions": per_caption,
            "seconds_total": time.perf_counter() - t0,
        }
        table = json.dumps({k: results[k] for k in ("verbatim", "template", "union_and_control")}, indent=1)
        return EvaluationResult(results, table)
