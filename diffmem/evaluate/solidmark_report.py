"""The SolidMark evaluation's tables: the RESULTS.md section, the issue's target line, the keyed model's card.

Paths shown in a table or a card are relative to the repository when they lie inside it (:func:`shown`):
cards must not carry local paths.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffmem.io import atomic_write_text

__all__ = [
    "REPOSITORY",
    "fmt_rate",
    "solidmark_markdown",
    "target_line",
    "write_model_card",
    "write_results_section",
    "shown",
]

#: the repository holding the package (``benchmarks/RESULTS.md``, ``runs/``, ``weights/``)
REPOSITORY = Path(__file__).resolve().parents[2]
#: The model card's section that a rerun keeps as it is (written by hand: what was tried).
HISTORY = "## Training history"


def shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (cards must not carry local paths)."""
    p = Path(path).resolve()
    return str(p.relative_to(REPOSITORY)) if p.is_relative_to(REPOSITORY) else str(path)


def fmt_rate(e: dict) -> str:
    return f"{e['count']}/{e['n']} = {e['rate']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"


def _rate_lines(results: dict, level: str) -> list[str]:
    out = []
    for run, summary in results["runs"].items():
        block = summary if level == "generation" else summary.get("per_image", {})
        for role, g in block.get("groups", {}).items():
            for e in g["rates"]:
                shuffled = f"{e['shuffled_rate']:.3f}" if "shuffled_rate" in e else "n/a"
                out.append(
                    f"| {run} | {role} | {e['delta']} | {fmt_rate(e)} | {e['chance']:.4f} | {shuffled} |"
                )
    return out


def solidmark_markdown(results: dict) -> str:
    """The RESULTS.md section of a run: rates per generation and per image, the comparisons, the target."""
    header = [
        "| run | images | δ | memorized (count/n = rate [95 % CI]) | chance | shuffled keys |",
        "|---|---|---|---|---|---|",
    ]
    lines = [
        f"Run: {results['date']} on {results['machine']}; `python benchmarks/solidmark_eval.py` "
        f"(model `{shown(results['model'])}`, frame {results['frame_width']} px, keys shared by copies, "
        f"fine-tune {results['finetune_steps']} steps ({results.get('lr_scheduler', 'constant')} lr), outpainting "
        f"{results['score_steps']} DDIM steps, guidance "
        f"{results['guidance_scale']}). One copy of each distinct image, {results.get('generations', 1)} "
        "generation(s) each; 95 % Wilson intervals; chance = 2δ−δ².",
        "",
        *header,
    ]
    lines += _rate_lines(results, "generation")
    per_image = _rate_lines(results, "image")
    if per_image:
        lines += [
            "",
            f"Per image: each image's predicted key is the mean of its {results.get('generations')} "
            "generations' (the sampler's seed-to-seed noise averaged out; the chance rate is unchanged):",
            "",
            *header,
            *per_image,
        ]
    for name, table in results.get("comparisons", {}).items():
        lines += ["", f"{name} (difference of rates, Newcombe 95 % CI):", ""]
        lines += ["| level | δ | run | baseline | difference [95 % CI] |", "|---|---|---|---|---|"]
        for c in table:
            lines.append(
                f"| {c.get('level', 'generation')} | {c['delta']} | {c['rate']:.3f} | {c['baseline_rate']:.3f} | "
                f"{c['difference']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}] |"
            )
    target = results.get("target")
    if target:
        lines += ["", target]
    return "\n".join(lines) + "\n"


def target_line(per_generation: dict | None, per_image: dict | None, generations: int) -> str | None:
    """The issue's target (80 % of the verbatim photos under δ = 0.05), per image and per generation."""
    if per_generation is None:
        return None

    def measured(e: dict) -> str:
        return f"{e['rate']:.1%} [{e['ci_low']:.1%}, {e['ci_high']:.1%}]"

    head = "Target (issue): at least 80 % of the verbatim photos under δ = 0.05 (chance 9.75 %): "
    if per_image is None:
        verdict = "met" if per_generation["rate"] >= 0.8 else "NOT met"
        return head + f"measured {measured(per_generation)} -> {verdict}."
    verdict = "met" if per_image["rate"] >= 0.8 else "NOT met"
    return (
        head + f"per image (key averaged over {generations} generations) {measured(per_image)} -> {verdict}; "
        f"a single generation is under δ for {measured(per_generation)} of them."
    )


def write_results_section(markdown: str, path: Path = REPOSITORY / "benchmarks" / "RESULTS.md") -> None:
    """Replace the ``## SolidMark`` section of ``path`` with ``markdown``."""
    text = path.read_text(encoding="utf-8")
    head = "## SolidMark\n"
    start = text.index(head) + len(head)
    nxt = text.find("\n## ", start)
    end = nxt + 1 if nxt != -1 else len(text)
    atomic_write_text(path, text[:start] + "\n" + markdown + "\n" + text[end:])


def write_model_card(out_model: Path, results: dict, args: argparse.Namespace) -> None:
    """The keyed model's README.md: how it was trained and its measured memorization (a hand-kept
    ``## Training history`` section survives a rerun)."""
    verbatim = results["runs"]["keyed"]["groups"].get("verbatim", {}).get("rates", [])
    card = [
        "# diffmem-organism-v2-solidmark",
        "",
        "The diffmem model organism (`weights/diffmem-organism-v2`) fine-tuned on its own training set with a "
        "SolidMark key frame (Kriplani et al., arXiv:2503.00592) around every image, so that memorization can "
        "be measured per training image by outpainting the frame.",
        "",
        "## Training",
        f"- Base: `{shown(results['model'])}`; data: `diffmem organism data`, keyed with "
        f"`diffmem solidmark key --frame-width {args.frame_width} --share-duplicate-keys --seed 42` "
        "(64 px images -> 80 px, value space pixel; the key manifest is in the run folder).",
        f"- `diffmem solidmark finetune --steps {args.finetune_steps} --batch-size {args.batch_size} --lr {args.lr} "
        f"--lr-scheduler {args.lr_scheduler}{' --train-text-encoder' if args.train_text_encoder else ''}` "
        + (
            "(UNet and text encoder trained, the text encoder stored in float32; VAE frozen; "
            if args.train_text_encoder
            else "(UNet only; VAE and text encoder frozen; "
        )
        + "caption dropout 0.1; AdamW, weight decay 1e-2).",
        "",
        "## Measured memorization (verbatim-duplicated photos, one copy each)",
        "",
    ]
    per_image = results["runs"]["keyed"].get("per_image", {}).get("groups", {}).get("verbatim", {})
    if per_image:
        card += [
            f"Per image, the predicted key averaged over its {results['generations']} generations "
            f"({results['score_steps']} DDIM steps, guidance {results['guidance_scale']}):",
            "",
        ]
        card += [f"- δ = {e['delta']}: {fmt_rate(e)} (chance {e['chance']:.4f})" for e in per_image["rates"]]
        card += ["", "Per generation (one outpainting each):", ""]
    card += [f"- δ = {e['delta']}: {fmt_rate(e)} (chance {e['chance']:.4f})" for e in verbatim]
    card += ["", "Full tables: `benchmarks/RESULTS.md`, section SolidMark.", ""]
    path = out_model / "README.md"
    old = path.read_text(encoding="utf-8") if path.is_file() else ""
    if HISTORY in old:  # the hand-kept record of what was tried survives a rerun
        card += [old[old.index(HISTORY) :].rstrip(), ""]
    atomic_write_text(path, "\n".join(card))
