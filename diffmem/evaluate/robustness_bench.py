"""``robustness``: no mitigation / subspace pruning / NeMo / adversarial fine-tuning, each attacked by Dori.

A table like the Finding Dori paper's: for the organism's verbatim-memorized photographs, the SSIM of
generations to the training image (mean ± std over targets; per target the mean over seeds) and the
memorization rate (fraction of targets whose mean SSIM exceeds ``--threshold``), from the caption and
from the Dori trigger; held-out quality as the median SSIM of held-out-caption generations to the
unedited model's (same seeds) and as caption fidelity (the fraction whose colour and shape a
classifier, ``diffmem.organism.fidelity``, reads as the ones named); the false-positive control (the
attack on images the model never saw). Every stage is cached in ``--out`` (:class:`RobustnessEvaluation`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from diffmem.attack.dori import DoriConfig
from diffmem.edits import NeuronSet, WeightMask
from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.evaluate.localization import localize_prompts
from diffmem.evaluate.robustness import RobustnessEvaluation, RobustnessSettings, Target
from diffmem.io import atomic_write_json, atomic_write_text
from diffmem.organism.data import OrganismData, build_organism_data, generic_and_heldout_pairs, render_generic
from diffmem.organism.fidelity import load_caption_classifier
from diffmem.organism.recipe import OrganismRecipe, recipe_of
from diffmem.scores.replication import PRESETS, ReplicationCriterion
from diffmem.seeding import derive_seed

__all__ = ["RobustnessBench"]


def _image_tensor(pixels) -> torch.Tensor:
    return torch.from_numpy(pixels).float().permute(2, 0, 1) / 255.0


def _targets(data: OrganismData, limit: int, min_copies: int | None) -> list[Target]:
    """The first ``limit`` verbatim images (with at least ``min_copies`` copies) as attack targets."""
    verbatim = data.by_role("verbatim", min_copies)
    return [Target(im.id, im.caption, _image_tensor(im.pixels)) for im in verbatim[:limit]]


def _controls(recipe: OrganismRecipe, limit: int) -> list[Target]:
    """Images the model never saw: held-out colour x shape pairs rendered as generic scenes."""
    _, held_pairs = generic_and_heldout_pairs()
    return [
        Target(
            f"control-{c}-{s}",
            f"a {c} {s}",
            _image_tensor(
                render_generic(c, s, derive_seed(recipe.seed, "dori-control", c, s), recipe.image_size)
            ),
        )
        for c, s in held_pairs[:limit]
    ]


def _retain_set(data: OrganismData, size: int) -> list[Target]:
    """``size`` generic training images (seeded pick) kept while fine-tuning."""
    generic = data.by_role("generic")
    pick = torch.randperm(len(generic), generator=torch.Generator().manual_seed(0))[:size].tolist()
    return [Target(generic[i].id, generic[i].caption, _image_tensor(generic[i].pixels)) for i in pick]


@register_evaluation
class RobustnessBench(Evaluation):
    name = "robustness"
    help = "no mitigation / pruning / NeMo / adversarial fine-tuning on the organism, each attacked by Dori"
    default_out = "runs/dori_eval"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add(
            "--recipe",
            default=None,
            help="recipe.json of the organism's data (default: the model folder's, else v2's)",
        )
        add("--targets", type=int, default=16, help="verbatim targets (default: all 16)")
        add(
            "--min-copies",
            type=int,
            default=None,
            help="only verbatim targets with at least N training copies (v3)",
        )
        add("--controls", type=int, default=8, help="non-memorized control images")
        add("--heldout", type=int, default=8, help="held-out captions for the quality check")
        add("--seeds", type=int, default=4)
        add(
            "--fidelity-captions",
            type=int,
            default=16,
            help="held-out captions for caption fidelity (all 16)",
        )
        add("--fidelity-seeds", type=int, default=4, help="seeds per caption for caption fidelity")
        add(
            "--classifier",
            default=None,
            help="caption classifier folder (default: weights/diffmem-caption-classifier)",
        )
        add("--gen-steps", type=int, default=25)
        add("--guidance-scale", type=float, default=7.5)
        add("--attack-steps", type=int, default=50)
        add("--attack-batch", type=int, default=8)
        add(
            "--threshold",
            type=float,
            default=PRESETS["organism-mean"].threshold,
            help='replication: mean SSIM over seeds >= this (default 0.7, PRESETS["organism-mean"])',
        )
        add(
            "--ratios", default="0.01,0.02,0.05,0.1", help="pruning ratios rho to try (first = paper default)"
        )
        add("--tau", type=int, default=10)
        add("--cond-only", action="store_true", help="pruning statistics from the conditional half only")
        add(
            "--reference",
            choices=("empty", "generic"),
            default="empty",
            help="reference prompts for pruning: the empty prompt (paper) or generic training captions",
        )
        add("--prune-steps", type=int, default=50)
        add(
            "--max-heldout-drop",
            type=float,
            default=0.5,
            help="pick a ratio whose held-out median SSIM stays above this",
        )
        add("--neurons", default=None, help="NeuronSet for the NeMo row (default: localize with NeMo here)")
        add(
            "--nemo-sets",
            default=None,
            help="folder of per-target NeuronSets (matched by caption) for the per-target NeMo rows "
            "(default: the ones localized here, OUT/nemo_neurons/)",
        )
        add("--no-nemo", action="store_true")
        add("--finetune-rounds", type=int, default=3)
        add("--finetune-lr", type=float, default=1e-4)
        add("--retain", type=int, default=64, help="generic training images used as retain data")
        add("--no-finetune", action="store_true")
        add(
            "--no-attack",
            action="store_true",
            help="only captions: no mitigation vs the pruning sweep (no Dori, no FT)",
        )
        add("--quick", action="store_true", help="8 targets, 4 controls, 2 seeds, 2 rounds")

    def check(self) -> None:
        args = self.args
        if args.quick:
            args.targets, args.controls, args.heldout, args.seeds = 8, 4, 4, 2
            args.finetune_rounds = min(args.finetune_rounds, 2)
        try:
            self.ratios = [float(r) for r in args.ratios.split(",")]
        except ValueError:
            raise ValueError(f"--ratios: expected comma-separated numbers, got {args.ratios!r}") from None

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        args, self.started = self.args, time.time()
        recipe = (
            OrganismRecipe.from_dict(json.loads(Path(args.recipe).read_text()))
            if args.recipe
            else recipe_of(args.model)
        )
        data = build_organism_data(recipe)
        self.targets = _targets(data, args.targets, args.min_copies)
        controls = _controls(recipe, args.controls)
        pipe = load_model(StableDiffusionPipeline)
        self.settings = RobustnessSettings(
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
        self.controls, self.ev = (
            controls,
            RobustnessEvaluation(
                pipe,
                self.targets,
                Path(args.out),
                heldout_captions=data.captions("heldout")[: args.heldout],
                settings=self.settings,
                fidelity=(load_caption_classifier(args.classifier), fidelity_sets, args.fidelity_seeds),
            ),
        )
        ev = self.ev
        ev.add_setting("Memorized captions, no mitigation", "none", attack=not args.no_attack)
        self._write_table()
        mask = self._pruning(data)
        if not args.no_attack:  # pruning alone is the cheapest measurement, for slow machines
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
            self._write_table()
            nemo_set = None if args.no_nemo else self._nemo(pipe, data)
            if not args.no_finetune:
                ev.adversarial_finetune(
                    nemo_set if nemo_set is not None else mask,
                    _retain_set(data, args.retain),
                    rounds=args.finetune_rounds,
                    lr=args.finetune_lr,
                )
        table = self._write_table()
        return EvaluationResult(ev.rows, table, [str(Path(args.out) / "weight_mask.safetensors")])

    def _pruning(self, data: OrganismData) -> WeightMask:
        """The pruning sweep over ``--ratios``; the chosen mask is saved as ``OUT/weight_mask.safetensors``."""
        args = self.args
        reference = (
            None
            if args.reference == "empty"
            else (data.captions("generic") * len(self.targets))[: len(self.targets)]
        )
        mask = self.ev.pruning_sweep(
            self.ratios,
            tau=args.tau,
            reference=reference,
            num_inference_steps=args.prune_steps,
            cond_only=args.cond_only,
            min_heldout=args.max_heldout_drop,
        )
        mask.save(Path(args.out) / "weight_mask.safetensors")
        return mask

    def _nemo(self, pipe, data: OrganismData) -> NeuronSet:
        """NeMo's rows: the union of the targets' neurons, and each target with its own where all are known."""
        args, ev, targets = self.args, self.ev, self.targets
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
                cache_dir=Path(args.out) / "nemo",
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
        self._write_table()
        return nemo_set

    def _write_table(self) -> str:
        """The table so far, written to ``OUT/table.md`` and ``OUT/table.json`` (after every setting)."""
        args, settings = self.args, self.settings
        header = (
            f"Model organism ({args.model or 'weights/diffmem-organism-v2'}), {len(self.targets)} verbatim targets, "
            f"{len(self.controls)} non-memorized controls, {args.seeds} seeds, {args.gen_steps} DDIM "
            f"steps, guidance {args.guidance_scale}; Dori: {settings.dori.steps} Adam steps, lr {settings.dori.lr}, "
            f"batch {settings.dori.batch_size}; replication: {settings.criterion.describe()}. Machine: "
            f"{platform.machine()} ({self.ev.pipe.device}), {time.strftime('%Y-%m-%d', time.gmtime())}, "
            f"{(time.time() - self.started) / 60:.1f} min for this run (cached stages excluded). Caption fidelity: "
            f"{args.fidelity_seeds} seeds per caption, the caption classifier "
            f"`{args.classifier or 'weights/diffmem-caption-classifier'}`."
        )
        text = self.ev.markdown(header)
        atomic_write_text(Path(args.out) / "table.md", text)
        atomic_write_json(Path(args.out) / "table.json", self.ev.rows)
        return text
