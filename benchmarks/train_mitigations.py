"""Training-time mitigations at one budget on the duplicated-subset ground truth (issue #18's table).

Fine-tunes the organism on a set where ``--duplicated`` of ``--images`` images repeat ``--repeats`` times,
once per row (``none``, ``ambient``, ``wen-filter``, three ``caption-noise`` members, ``lora``, MemControl's mask),
at the same steps, batch, lr and seed, and measures each (diffmem.train.mitigation_study): replication of
the duplicated images, caption fidelity, first-step detection AUC, training time; MemControl's Pareto front
and its search cost. Resumable: rerun the same command.

    python benchmarks/train_mitigations.py --out runs/train_mitigations
    python benchmarks/train_mitigations.py --quick --out runs/train_mitigations_quick

It prints the markdown tables for benchmarks/RESULTS.md and writes them to ``OUT/table.md``;
the numbers go to ``benchmarks/results/train_mitigations.json``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
from pathlib import Path

from machine import cpu_model

from diffmem.io import atomic_write_json, atomic_write_text


def _pct(r: dict) -> str:
    return f"{r['rate']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}]"


def _yes(flag) -> str:
    return "n/a" if flag is None else ("met" if flag else "**missed**")


def tables(results: dict) -> str:
    rows, goals = results["rows"], results["goals"]
    lines = [
        "| row | replication, duplicated (own) | seen once (own) | fidelity generic | fidelity held-out "
        "| first-step AUC (chance 0.5) | training s (median s/step) | replication goal (<= 1/4 of none) | fidelity goal (>= none - 0.05) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ev, g = row["evaluation"], goals.get(name, {})
        rep, fid, det = ev["replication"], ev["fidelity"], ev["detection"]
        fid_goal = (
            ""
            if not g
            else f"{_yes(g['fidelity_generic_goal_met'])} / {_yes(g['fidelity_heldout_goal_met'])}"
        )
        share = g.get("share_of_none")
        rep_goal = (
            ""
            if not g
            else f"{_yes(g['replication_goal_met'])}" + (f" ({share:.2f}x)" if share is not None else "")
        )
        training = row.get("training", {})
        seconds = (
            "" if not training else f"{training['seconds']:.0f} ({training['median_seconds_per_step']:.3f})"
        )
        lines.append(
            f"| {name} | {_pct(rep['duplicated']['own'])} | {_pct(rep['single']['own'])} "
            f"| {fid['generic']['both']:.3f} [{fid['generic']['both_ci'][0]:.3f}, {fid['generic']['both_ci'][1]:.3f}] "
            f"| {fid['heldout']['both']:.3f} [{fid['heldout']['both_ci'][0]:.3f}, {fid['heldout']['both_ci'][1]:.3f}] "
            f"| {det['auc']:.3f} [{det['auc_ci'][0]:.3f}, {det['auc_ci'][1]:.3f}] "
            f"| {seconds} | {rep_goal} | {fid_goal} |"
        )
    mc = results.get("memcontrol")
    if mc:
        objectives = mc.get("objectives", {"memorization": "noise-gap", "quality": "heldout-loss"})
        quality_label = {"heldout-loss": "held-out loss", "caption-fidelity": "1 - caption fidelity"}[
            objectives["quality"]
        ]
        lines += [
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
            mark = (
                "chosen" if t["number"] == mc["chosen"]["number"] else ("yes" if t["number"] in front else "")
            )
            lines.append(
                f"| {t['number']} | {len(t['blocks'])} | {t['lr']:.2e} | {t['memorization']:.3f} "
                f"| {t['quality_loss']:.4f} | {t['seconds']:.0f} | {mark} |"
            )
        none_s = rows.get("none", {}).get("training", {}).get("seconds")
        if none_s:
            lines += [
                "",
                f"Search cost: {mc['search_seconds']:.0f} s, {mc['search_seconds'] / none_s:.2f}x one plain fine-tune ({none_s:.0f} s).",
            ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    from diffmem.train.memcontrol import MemControlConfig
    from diffmem.train.mitigation_study import ROWS, StudyConfig, build_set_once, run_mitigation_study
    from diffmem.train.text_to_image import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="organism folder (default: weights/diffmem-organism-v2)")
    ap.add_argument("--out", default="runs/train_mitigations")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--duplicated", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--trials", type=int, default=10, help="MemControl trials (the paper's 10)")
    ap.add_argument("--memcontrol-steps", type=int, default=200, help="each trial's fine-tune")
    ap.add_argument("--memcontrol-mode", choices=("lora", "full"), default="lora",
                    help="what MemControl's trials and its row train in the chosen blocks")  # fmt: skip
    ap.add_argument("--memorization", default="noise-gap", help="MemControl's memorization objective")
    ap.add_argument("--quality", default="heldout-loss", help="MemControl's quality objective")
    ap.add_argument("--memcontrol-seed", type=int, default=0, help="the search's seed (sampler, objectives)")
    ap.add_argument("--objective-generations", type=int, default=4,
                    help="generations per caption of MemControl's objectives that generate")  # fmt: skip
    ap.add_argument("--wen-filter-tau", type=float, default=None,
                    help="wen-filter's threshold (default: the study's quantile of the pretrained model's gaps)")  # fmt: skip
    ap.add_argument("--seeds-per-caption", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="a small set, 40 steps, 2 trials, 1 seed")
    ap.add_argument("--device", default=None, help="evaluations and objectives (default: cuda if available)")
    ap.add_argument("--results", default="benchmarks/results/train_mitigations.json")
    args = ap.parse_args()
    if args.quick:
        args.images, args.duplicated, args.repeats = 24, 4, 4
        args.steps, args.trials, args.memcontrol_steps, args.seeds_per_caption = 40, 2, 10, 1

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = build_set_once(
        out / "finetune", n_images=args.images, duplicated=args.duplicated, repeats=args.repeats, seed=0
    )
    wen_tau = {} if args.wen_filter_tau is None else {"wen-filter": {"tau": args.wen_filter_tau}}
    config = StudyConfig(
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
        evaluation={"seeds_per_caption": args.seeds_per_caption, "num_inference_steps": 25},
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    results = run_mitigation_study(args.model, data, out / "study", config, device=device)
    results["machine"] = {"cpu": cpu_model(), "platform": platform.platform()}
    results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    text = tables(results)
    atomic_write_text(out / "table.md", text)
    if not args.quick:  # the per-image rows and per-caption scores stay in OUT/study/<row>/evaluation.json
        for row in results["rows"].values():
            row["evaluation"].pop("per_image", None)
            row["evaluation"]["detection"].pop("scores", None)
        atomic_write_json(args.results, results)
    print(text)


if __name__ == "__main__":
    main()
