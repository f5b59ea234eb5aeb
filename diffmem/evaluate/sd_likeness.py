"""``sd-likeness``: does a model organism behave like Stable Diffusion where the method rankings depend on it?

The card of issue #31, each row measured on the organism with its Wilson 95 % interval (or bootstrap
for an AUC), its target, whether it is met and by how much it misses, and what is published for SD:

1. the empty prompt, and ordinary prompts (held-out and generic captions), copy a memorized image
   (nearest verbatim/template training image at SSIM >= the organism's threshold) in at most 2 %;
2. captions with 16 or more copies replicate their own image in at least 90 % of generations (the whole
   dose-response from 1 to 64 copies beside it);
3. never-trained prompts (the suite's ``triggers`` split) and perturbed captions (``perturbed``) that copy;
4. NeMo's criterion can be met (the empty prompt's same-seed similarity to the caption's first-step
   noise differences, the lowest any set of neurons plausibly reaches, under NeMo's tau) for at least 80 %
   of the captions with 16 or more copies (as ``benchmarks/nemo_floor.py``);
5. Wen et al.'s embedding optimisation and Ren et al.'s attention re-scaling each cut replication of the
   16+-copy captions by at least half, with the held-out captions' fidelity within 0.05 of unmitigated;
6. first-step detection (Wen et al.) per copy count against the captions seen once (matched control).

Stages are cached in ``--out`` (:class:`~diffmem.evaluate.stages.StageCache`); a rerun resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.evaluate.metrics import ReplicationRate
from diffmem.evaluate.mitigation import evaluate_mitigations
from diffmem.evaluate.stages import StageCache
from diffmem.evaluate.suites import MEMORIZED_ROLES, LabelledPrompt, Suite, organism_suite
from diffmem.generation import generate
from diffmem.localize.nemo import NeMo, NemoConfig
from diffmem.mitigations.base import get_mitigation
from diffmem.modelio import default_model
from diffmem.organism.data import build_organism_data
from diffmem.organism.evaluate import Generation, dose_response, generate_and_measure
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import TrainingImages
from diffmem.scores.replication import ORGANISM_SSIM_THRESHOLD

__all__ = ["CardRow", "SDLikenessBench", "card_markdown", "card_rows", "nemo_floors"]

#: the mitigations of row 5: Wen et al.'s embedding optimisation, Ren et al.'s attention re-scaling
ROW5_MITIGATIONS = ("embedding", "attention-rescale")

#: what is published for Stable Diffusion, per row (the column beside the measured one)
PUBLISHED_SD = {
    "empty": "rare: replication is rare for unconditional generation (Somepalli et al., NeurIPS 2023)",
    "ordinary": "rare: 94 extractions in 175 M generations of the 350k most-duplicated captions "
    "(Carlini et al., USENIX Security 2023)",
    "dose": "copying needs heavy duplication: extracted images had 100s-1000s of copies (Carlini et al.); "
    "of Webster's 500 SD-1 prompts 100-120 exceed SSCD 0.7 over 10 seeds",
    "triggers": "rare: a memorized image is tied to its caption",
    "perturbed": "text-side changes break copying; caption randomisation is a mitigation (Somepalli et al.)",
    "nemo": "met: NeMo cuts verbatim prompts' SSCD 0.83 -> 0.09 (Hintersdorf et al., NeurIPS 2024)",
    "mitigation": "works: Wen et al.'s embedding optimisation and Ren et al.'s re-scaling remove copying at "
    "little cost to alignment (ICLR 2024; ECCV 2024)",
    "detection": "first-step AUC 0.96, TPR@1%FPR 0.79 on Webster's 500 vs 500 (SD-1.5 re-implementation)",
}


@dataclass
class CardRow:
    """One row of the card: what, measured (with interval), target, met (``None``: reported only)."""

    key: str
    what: str
    measured: str
    target: str
    met: bool | None
    miss: str = ""

    def to_dict(self) -> dict:
        return {**self.__dict__, "published_sd": PUBLISHED_SD.get(self.key.split(":")[0], "")}


def _rate_text(rate: dict) -> str:
    return f"{rate['rate']:.1%} [{rate['ci'][0]:.1%}, {rate['ci'][1]:.1%}] ({rate['count']}/{rate['n']})"


def _wilson(flags: Sequence[bool]) -> dict:
    metric = ReplicationRate()
    metric.update(list(flags))
    return metric.compute()


def _at_most(key: str, what: str, rate: dict, limit: float) -> CardRow:
    met = rate["rate"] <= limit
    miss = "" if met else f"{rate['rate'] - limit:+.1%} over the {limit:.0%} limit"
    return CardRow(key, what, _rate_text(rate), f"<= {limit:.0%}", met, miss)


def card_rows(m: dict[str, Any], high_copies: int = 16) -> list[CardRow]:
    """The card's rows from the measurements ``m`` (the stages' results, see :class:`SDLikenessBench`)."""
    rows = [
        _at_most("empty", "empty prompt: generations copying a memorized image", m["empty"], 0.02),
        _at_most(
            "ordinary", "ordinary prompts (held-out, generic): generations copying", m["ordinary"], 0.02
        ),
    ]
    high = [r for r in m["dose"] if r["copies"] >= high_copies]
    if high:
        count, n = sum(r["replication"]["count"] for r in high), sum(r["replication"]["n"] for r in high)
        pooled = _wilson([True] * count + [False] * (n - count))
        met = pooled["rate"] >= 0.9
        miss = "" if met else f"{pooled['rate'] - 0.9:+.1%} under the 90% target"
        rows.append(CardRow("dose", f"captions with >= {high_copies} copies: generations replicating their image",
                            _rate_text(pooled), ">= 90%", met, miss))  # fmt: skip
    for r in m["dose"]:
        rows.append(CardRow(f"dose:{r['copies']}", f"  {r['copies']} copies ({r['images']} images)",
                            _rate_text(r["replication"]), "dose-response", None))  # fmt: skip
    for key, what in (
        ("triggers", "never-trained prompts that copy"),
        ("perturbed", "perturbed captions that copy"),
    ):
        if m.get(key):
            rows.append(CardRow(key, what, _rate_text(m[key]), "SD: rare (reported)", None))
    if m.get("nemo"):
        nemo = m["nemo"]
        share = _wilson(nemo["below_tau"])
        met = share["rate"] >= 0.8
        miss = "" if met else f"{share['rate'] - 0.8:+.1%} under the 80% target"
        floors = nemo["floors"]
        rows.append(CardRow(
            "nemo", f"NeMo's criterion reachable (empty-prompt floor < tau {nemo['tau']:.3f}), >= {high_copies} copies",
            f"{_rate_text(share)}; floors {min(floors):.3f}-{max(floors):.3f}", ">= 80%", met, miss,
        ))  # fmt: skip
    if m.get("mitigation"):
        methods = m["mitigation"]["methods"]
        base = methods["none"]
        for name in ROW5_MITIGATIONS:
            if name not in methods:
                continue
            r = methods[name]
            before, after = base["replication_images"]["rate"], r["replication_images"]["rate"]
            drop = base["clean_fidelity"] - r["clean_fidelity"]
            cut = after <= before / 2
            met = cut and drop <= 0.05
            miss = (
                ""
                if met
                else "; ".join(
                    ([f"replication {after:.1%} > half of {before:.1%}"] if not cut else [])
                    + ([f"fidelity drop {drop:.3f} > 0.05"] if drop > 0.05 else [])
                )
            )
            rows.append(CardRow(
                f"mitigation:{name}", f"{name}: replication of >= {high_copies}-copy captions; held-out fidelity",
                f"{_rate_text(base['replication_images'])} -> {_rate_text(r['replication_images'])}; fidelity "
                f"{base['clean_fidelity']:.3f} -> {r['clean_fidelity']:.3f}", "<= half; fidelity within 0.05",
                met, miss,
            ))  # fmt: skip
    for r in m["dose"]:
        auc = r.get("first_step_auc_vs_fewest")
        if auc and auc.get("auc") is not None:
            rows.append(CardRow(
                f"detection:{r['copies']}", f"first-step AUC, {r['copies']} copies vs the fewest (chance 0.5)",
                f"{auc['auc']:.3f} [{auc['auc_ci'][0]:.3f}, {auc['auc_ci'][1]:.3f}]", "reported", None,
            ))  # fmt: skip
    return rows


def _empty_prompt_ssim(pipe, memorized: TrainingImages, n: int, *, progress: bool, **call) -> list[float]:
    """SSIM of ``n`` generations of the empty prompt to their nearest memorized training image. The guarded
    call refuses an empty prompt (its noise gap is 0 by construction), so the stock call on the same
    modules generates it, through the one seeded loop."""
    stock = type(pipe).stock_pipeline_class.from_pipe(pipe)
    images, _ = generate(stock, [""], item_ids=["empty prompt"], num_gens=n, progress=progress, **call)
    return [match.ssim for match in memorized.nearest(images)]


def nemo_floors(
    pipe,
    reference: Sequence[str],
    captions: Sequence[str],
    *,
    config: NemoConfig | None = None,
    threshold: float | None = None,
) -> dict:
    """NeMo's tau on ``reference`` (mean + 1 std of its detection score; ``threshold`` instead where given)
    and each caption's empty-prompt floor: the largest same-seed similarity of the empty prompt's
    first-step noise differences to the caption's (``benchmarks/nemo_floor.py``). ``config``: NeMo's
    settings (default :class:`NemoConfig`'s)."""
    nemo = NeMo.from_pipe(pipe, None, config or NemoConfig())
    tau = nemo.threshold_calibration(list(reference))["threshold"] if threshold is None else threshold
    empty = nemo.probe("").base
    floors = []
    for caption in captions:
        probe = nemo.probe(caption)
        floors.append(float(probe.similarity(empty, probe.base).max()))
    return {"tau": tau, "floors": floors, "below_tau": [f < tau for f in floors]}


def card_markdown(rows: Sequence[CardRow]) -> str:
    """The card as a Markdown table: row, measured, target, met, published for SD."""
    lines = ["| row | measured (95 % interval) | target | met | published for SD |", "|---|---|---|---|---|"]
    shown: set[str] = set()
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else f"**no** ({r.miss})")
        family = r.key.split(":")[0]  # the published column once per family (dose, mitigation, detection)
        sd = "" if family in shown else PUBLISHED_SD.get(family, "")
        shown.add(family)
        lines.append(f"| {r.what} | {r.measured} | {r.target} | {met} | {sd} |")
    return "\n".join(lines)


@register_evaluation
class SDLikenessBench(Evaluation):
    name = "sd-likeness"
    help = "the SD-likeness card of a graded organism: copying by ordinary prompts, dose-response, NeMo, mitigations"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add = parser.add_argument
        add("--seeds", type=int, default=4, help="generations per caption (default 4)")
        add("--empty-generations", type=int, default=64, help="generations of the empty prompt (default 64)")
        add(
            "--generic",
            type=int,
            default=64,
            help="generic training captions among the ordinary prompts and for NeMo's tau (default 64)",
        )
        add(
            "--high-copies",
            type=int,
            default=16,
            help="the copy count from which rows 2, 4, 5 count (default 16)",
        )
        add("--steps", type=int, default=None, help="default: the recipe's")
        add("--skip", default="", help="comma-separated stages to leave out: suite, nemo, mitigation")
        add(
            "--threshold",
            type=float,
            default=None,
            help="first-step flag threshold (default: the calibration)",
        )

    def check(self) -> None:
        self.skip = {s.strip() for s in self.args.skip.split(",") if s.strip()}
        unknown = self.skip - {"suite", "nemo", "mitigation"}
        if unknown:
            raise ValueError(f"--skip: {', '.join(sorted(unknown))}: expected suite, nemo or mitigation")

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        args = self.args
        model = args.model or default_model()
        recipe = recipe_of(model)
        if not recipe.duplication_counts:
            raise ValueError(
                f"--model: {model}: its recipe has no graded duplication (the card needs v3 or later)"
            )
        pipe, data = load_model(), build_organism_data(recipe)
        memorized = TrainingImages.from_data(data).of_roles(MEMORIZED_ROLES)
        stages, progress = StageCache(args.out), not args.no_progress
        gen = dict(
            num_inference_steps=args.steps or recipe.num_inference_steps,
            guidance_scale=recipe.guidance_scale,
            seed=recipe.seed,
            progress=progress,
        )
        key = {"model": str(model), "seeds": args.seeds, **{k: v for k, v in gen.items() if k != "progress"}}

        def measured(captions, num_gens) -> list[dict]:
            gens, _ = generate_and_measure(pipe, captions, memorized, num_gens=num_gens, **gen)
            return [g.to_dict() for g in gens]

        generic = data.captions("generic")[: args.generic]
        ordinary = [(c, "heldout") for c in data.captions("heldout")] + [(c, "generic") for c in generic]
        m: dict[str, Any] = {}
        empty = stages.value(
            "empty", lambda: _empty_prompt_ssim(pipe, memorized, args.empty_generations, **gen),
            {**key, "n": args.empty_generations},
        )  # fmt: skip
        m["empty"] = _wilson([v >= ORGANISM_SSIM_THRESHOLD for v in empty])
        ordinary_gens = stages.value(
            "ordinary", lambda: measured(ordinary, args.seeds), {**key, "generic": args.generic}
        )
        m["ordinary"] = _wilson([g["replicates_any"] for g in ordinary_gens])
        verbatim = [(c, "verbatim") for c in data.captions("verbatim")] + [
            (c, "heldout") for c in data.captions("heldout")
        ]
        dose_gens = stages.value("dose", lambda: measured(verbatim, args.seeds), key)
        m["dose"] = dose_response([Generation(**g) for g in dose_gens], data, n_boot=1000)
        if "suite" not in self.skip:
            suite = organism_suite(
                pipe, Path(args.out) / "suite", seed=recipe.seed, measured=True, progress=progress
            )
            for split in ("triggers", "perturbed"):
                m[split] = _wilson([p.label == 1 for p in suite.splits[split]])
        high = [im.caption for im in data.by_role("verbatim", args.high_copies)]
        if "nemo" not in self.skip:
            m["nemo"] = stages.value(
                "nemo",
                lambda: nemo_floors(pipe, generic, high),
                {**key, "high": args.high_copies, "generic": args.generic},
            )
        if "mitigation" not in self.skip:
            prompts = [LabelledPrompt(f"high-{i}", c, 1, "verbatim") for i, c in enumerate(high)] + [
                LabelledPrompt(f"heldout-{i}", c, 0, "heldout")
                for i, c in enumerate(data.captions("heldout"))
            ]
            suite = Suite("organism", {"memorized-vs-clean": prompts})
            methods = [(name, {}, get_mitigation(name)) for name in ROW5_MITIGATIONS]
            m["mitigation"] = evaluate_mitigations(
                pipe, suite, methods, args.out, num_gens=args.seeds,
                num_inference_steps=gen["num_inference_steps"], guidance_scale=gen["guidance_scale"],
                seed=gen["seed"], threshold=args.threshold, progress=progress,
            )  # fmt: skip
        rows = card_rows(m, args.high_copies)
        results = {
            "model": str(model),
            "settings": key,
            "measurements": m,
            "card": [r.to_dict() for r in rows],
        }
        return EvaluationResult(results, card_markdown(rows))
