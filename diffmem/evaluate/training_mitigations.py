"""``training-mitigations``: the training-time mitigations at one budget on the duplicated-subset ground truth.

Fine-tunes the organism on a set where ``--duplicated`` of ``--images`` images repeat ``--repeats`` times,
once per row (``none``, ``ambient``, ``wen-filter``, three ``caption-noise`` members, ``lora``, MemControl's
mask), at the same steps, batch, lr and seed, and measures each (:mod:`diffmem.train.mitigation_study`):
replication of the duplicated images, caption fidelity, first-step detection AUC, training time;
MemControl's Pareto front and its search cost. Resumable: rerun the same command. ``--out`` gets
``table.md`` and ``results.json``; without ``--quick`` the numbers (less the per-image rows and per-caption
scores, kept in ``OUT/study/<row>/evaluation.json``) also go to ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

import torch

from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.evaluate.machine import cpu_model
from diffmem.io import atomic_write_json
from diffmem.train.memcontrol import MemControlConfig
from diffmem.train.mitigation_study import ROWS, StudyConfig, build_set_once, run_mitigation_study
from diffmem.train.text_to_image import TrainConfig

__all__ = ["TrainingMitigations", "training_mitigation_tables"]

#: ``--quick``: a small set, 40 steps, 2 trials of 10 steps, 1 seed per caption
QUICK = dict(images=24, duplicated=4, repeats=4, steps=40, trials=2, memcontrol_steps=10, seeds_per_caption=1)


def _pct(r: dict) -> str:
    return f"{r['rate']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]"


def _yes(flag) -> str:
    return "n/a" if flag is None else ("met" if flag else "**missed**")


def _row_line(name: str, row: dict, goals: dict) -> str:
    ev, g = row["evaluation"], goals.get(name, {})
    rep, fid, det = ev["replication"], ev["fidelity"], ev["detection"]
    fid_goal = (
        "" if not g else f"{_yes(g['fidelity_generic_goal_met'])} / {_yes(g['fidelity_heldout_goal_met'])}"
    )
    share = g.get("share_of_none")
    rep_goal = (
        ""
        if not g
        else f"{_yes(g['replication_goal_met'])}" + (f" ({share:.2f}x)" if share is not None else "")
    )
    training = row.get("training", {})
    seconds = "" if not training else f"{training['seconds']:.0f} ({training['median_seconds_per_step']:.3f})"
    return (
        f"| {name} | {_pct(rep['duplicated']['own'])} | {_pct(rep['single']['own'])} "
        f"| {fid['generic']['both']:.3f} [{fid['generic']['both_ci'][0]:.3f}, {fid['generic']['both_ci'][1]:.3f}] "
        f"| {fid['heldout']['both']:.3f} [{fid['heldout']['both_ci'][0]:.3f}, {fid['heldout']['both_ci'][1]:.3f}] "
        f"| {det['auc']:.3f} [{det['auc_ci'][0]:.3f}, {det['auc_ci'][1]:.3f}] "
        f"| {seconds} | {rep_goal} | {fid_goal} |"
    )


def _memcontrol_lines(mc: dict, none_seconds: float | None) -> list[str]:
    objectives = mc.get("objectives", {"memorization": "noise-gap", "quality": "heldout-loss"})
    quality_label = {"heldout-loss": "held-out loss", "caption-fidelity": "1 - caption fidelity"}[
        objectives["quality"]
    ]
    lines = [
        "",
        f"MemControl trials (memorization: {objectives['memorization']} on the duplicated rows; quality: "
        f"{objectives['quality']}; both minimised; base model {mc['baseline']['memorization']:.3f} / "
        f"{mc['baseline']['quality_loss']:.4f}):",
        "",
        f"| trial | blocks | lr | {objectives['memorization']} | {quality_label} | s | on the front |",
        "|---|---|---|---|---|---|---|",
    ]
    front = {t["number"] for t in mc["front"]}
    for t in mc["trials"]:
        mark = "chosen" if t["number"] == mc["chosen"]["number"] else ("yes" if t["number"] in front else "")
        lines.append(
            f"| {t['number']} | {len(t['blocks'])} | {t['lr']:.2e} | {t['memorization']:.3f} "
            f"| {t['quality_loss']:.4f} | {t['seconds']:.0f} | {mark} |"
        )
    if none_seconds:
        lines += [
            "",
            f"Search cost: {mc['search_seconds']:.0f} s, {mc['search_seconds'] / none_seconds:.2f}x one plain "
            f"fine-tune ({none_seconds:.0f} s).",
        ]
    return lines


def training_mitigation_tables(results: dict) -> str:
    """The study's Markdown tables: one row per mitigation against ``none``'s goals, then MemControl's trials."""
    rows, goals = results["rows"], results["goals"]
    lines = [
        "| row | replication, duplicated (own) | seen once (own) | fidelity generic | fidelity held-out "
        "| first-step AUC (chance 0.5) | training s (median s/step) | replication goal (<= 1/4 of none) "
        "| fidelity goal (>= none - 0.05) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_line(name, row, goals) for name, row in rows.items()]
    if results.get("memcontrol"):
        none_seconds = rows.get("none", {}).get("training", {}).get("seconds")
        lines += _memcontrol_lines(results["memcontrol"], none_seconds)
    return "\n".join(lines) + "\n"


@register_evaluation
class TrainingMitigations(Evaluation):
    name = "training-mitigations"
    help = (
        "the training-time mitigations (ambient, wen-filter, caption noise, LoRA, MemControl) at one budget "
        "on the duplicated-subset ground truth"
    )
    default_out = "runs/train_mitigations"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--images", type=int, default=200, help="images in the fine-tuning set")
        parser.add_argument("--duplicated", type=int, default=20, help="images of the set that repeat")
        parser.add_argument("--repeats", type=int, default=20, help="copies of each duplicated image")
        parser.add_argument("--steps", type=int, default=2000, help="every row's fine-tuning steps")
        parser.add_argument("--batch-size", type=int, default=16)
        parser.add_argument("--lr", type=float, default=1e-4)
        parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
        parser.add_argument("--trials", type=int, default=10, help="MemControl trials (the paper's 10)")
        parser.add_argument("--memcontrol-steps", type=int, default=200, help="each trial's fine-tune")
        parser.add_argument(
            "--memcontrol-mode",
            choices=("lora", "full"),
            default="lora",
            help="what MemControl's trials and its row train in the chosen blocks",
        )
        parser.add_argument("--memorization", default="noise-gap", help="MemControl's memorization objective")
        parser.add_argument("--quality", default="heldout-loss", help="MemControl's quality objective")
        parser.add_argument(
            "--memcontrol-seed", type=int, default=0, help="the search's seed (sampler, objectives)"
        )
        parser.add_argument(
            "--objective-generations",
            type=int,
            default=4,
            help="generations per caption of MemControl's objectives that generate",
        )
        parser.add_argument(
            "--wen-filter-tau",
            type=float,
            default=None,
            help="wen-filter's threshold (default: the study's quantile of the pretrained model's gaps)",
        )
        parser.add_argument("--seeds-per-caption", type=int, default=4)
        parser.add_argument(
            "--eval-steps", type=int, default=25, help="sampling steps of each row's evaluation (default 25)"
        )
        parser.add_argument("--quick", action="store_true", help="a small set, 40 steps, 2 trials, 1 seed")
        parser.add_argument("--results", default="benchmarks/results/train_mitigations.json")

    def check(self) -> None:
        args = self.args
        if args.quick:
            for key, value in QUICK.items():
                setattr(args, key, value)
        if args.dtype != "float32":
            raise ValueError(f"--dtype: the study trains and measures in float32, got {args.dtype}")
        wen_tau = {} if args.wen_filter_tau is None else {"wen-filter": {"tau": args.wen_filter_tau}}
        self.config = StudyConfig(
            train=TrainConfig(
                steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=200, seed=0
            ),
            rows=tuple(args.rows),
            mitigation_options=wen_tau,
            memcontrol=MemControlConfig(
                trials=args.trials,
                seed=args.memcontrol_seed,
                memorization=args.memorization,
                quality=args.quality,
                generations=args.objective_generations,
                fidelity_generations=args.objective_generations,
            ),
            memcontrol_steps=args.memcontrol_steps,
            memcontrol_mode=args.memcontrol_mode,
            evaluation={"seeds_per_caption": args.seeds_per_caption, "num_inference_steps": args.eval_steps},
        )
        self.config.check()

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        """The study loads each row's model itself (the base, then every fine-tuned folder)."""
        args = self.args
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = build_set_once(
            out / "finetune", n_images=args.images, duplicated=args.duplicated, repeats=args.repeats, seed=0
        )
        device = args.device or ("cuda" if torch.cuda.is_available() else None)
        results = run_mitigation_study(
            args.model, data, out / "study", self.config, device=device, progress=not args.no_progress
        )
        results["machine"] = {"cpu": cpu_model(), "platform": platform.platform()}
        results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
        table = training_mitigation_tables(results)
        files = []
        if (
            not args.quick
        ):  # the per-image rows and per-caption scores stay in OUT/study/<row>/evaluation.json
            for row in results["rows"].values():
                row["evaluation"].pop("per_image", None)
                row["evaluation"]["detection"].pop("scores", None)
            atomic_write_json(args.results, results)
            files.append(str(args.results))
        return EvaluationResult(results, table, files)
