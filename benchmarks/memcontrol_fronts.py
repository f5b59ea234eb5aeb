"""A finished MemControl search's trials under a second quality objective: the held-out denoising loss.

Reads ``SEARCH/pareto.json`` (``diffmem memcontrol`` or the mitigation study), scores every trial's saved
model, and any ``--extra NAME=MODEL`` (e.g. the base model and the plain fine-tune), with
:func:`diffmem.train.memcontrol.validation_loss` on ``--heldout``, and prints the Pareto front of
(the search's memorization objective, held-out loss) over the same trials beside the search's own front.
The trials are those the search drew with its own objectives: this is a second front over them, not a
second search.

    python benchmarks/memcontrol_fronts.py --search runs/tm/study/memcontrol --heldout runs/tm/study/heldout \
        --extra base= --extra none=runs/tm/study/none/model
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from machine import cpu_model

from diffmem.guard.auto import load_guarded
from diffmem.io import atomic_write_json
from diffmem.modelio import model_resolution
from diffmem.train.memcontrol import validation_loss
from diffmem.train.text_to_image import load_training_data


def pareto_numbers(points: dict[int, tuple[float, float]]) -> set[int]:
    """The keys of the non-dominated points (both objectives minimised), by Optuna's own front."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["minimize", "minimize"])
    dist = optuna.distributions.IntDistribution(0, max(points))
    for key, values in points.items():
        study.add_trial(
            optuna.trial.create_trial(params={"key": key}, distributions={"key": dist}, values=list(values))
        )
    return {t.params["key"] for t in study.best_trials}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--search", required=True, help="the search folder (pareto.json)")
    ap.add_argument("--heldout", required=True, help="held-out captioned images")
    ap.add_argument("--extra", action="append", default=[], help="NAME=MODEL (empty MODEL: the organism)")
    ap.add_argument("--seed", type=int, default=None, help="the loss's draws (default: the search's seed)")
    ap.add_argument("--results", default="benchmarks/results/memcontrol_fronts.json")
    args = ap.parse_args()

    search = json.loads((Path(args.search) / "pareto.json").read_text(encoding="utf-8"))
    settings = json.loads((Path(args.search) / "memcontrol.json").read_text(encoding="utf-8"))
    seed = settings["search"]["seed"] if args.seed is None else args.seed
    trials = search["trials"]
    heldout = load_training_data(args.heldout, model_resolution(load_guarded(trials[0]["model"]))[0])
    losses = {}
    for t in trials:
        losses[t["number"]] = validation_loss(load_guarded(t["model"]), heldout, seed)
        print(f"trial {t['number']}: held-out loss {losses[t['number']]:.4f}", flush=True)
    extras = {}
    for item in args.extra:
        name, _, model = item.partition("=")
        extras[name] = validation_loss(load_guarded(model or None), heldout, seed)
        print(f"{name}: held-out loss {extras[name]:.4f}", flush=True)
    own_front = {t["number"] for t in search["front"]}
    loss_front = pareto_numbers({t["number"]: (t["memorization"], losses[t["number"]]) for t in trials})
    objectives = search.get("objectives", {"memorization": "noise-gap", "quality": "heldout-loss"})
    lines = [
        f"| trial | blocks | lr | {objectives['memorization']} | {objectives['quality']} | held-out loss "
        "| search's front | front with held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for t in trials:
        n = t["number"]
        lines.append(
            f"| {n} | {len(t['blocks'])} | {t['lr']:.2e} | {t['memorization']:.3f} | {t['quality_loss']:.4f} "
            f"| {losses[n]:.4f} | {'yes' if n in own_front else ''} | {'yes' if n in loss_front else ''} |"
        )
    lines += [f"| {name} | | | | | {loss:.4f} | | |" for name, loss in extras.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_json(
        args.results,
        {
            "search": str(args.search), "heldout": str(args.heldout), "seed": seed, "objectives": objectives,
            "heldout_loss": losses, "extras": extras, "search_front": sorted(own_front),
            "heldout_loss_front": sorted(loss_front), "machine": cpu_model(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        },
    )  # fmt: skip


if __name__ == "__main__":
    main()
