"""The harness's tables (Markdown) and report (HTML with every method's ROC curve on one plot per split)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffmem.evaluate.detection import load_scores
from diffmem.report import escape, figure_tag, roc_curves_figure, table_html, write_html

__all__ = ["detection_markdown", "write_detection_report"]


def _ci(value, ci) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def detection_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (method, split), led by TPR at 1 % FPR at one generation (the deployable budget), then
    the cost, then AUC, then the all-generations metrics; within a split the best TPR comes first."""
    n = results["settings"]["num_gens"]
    ranked = []
    for key, method in results["methods"].items():
        for split, budgets in method["splits"].items():
            full, one = budgets[f"gens_{n}"], budgets["gens_1"]
            row = {
                "method": key,
                "split": split,
                "TPR@1%FPR (1 gen)": _ci(one.get("tpr_at_1pct_fpr"), one.get("tpr_ci")),
                "UNet evals / prompt": f"{method['cost']['unet_evals_per_prompt']:g}",
                "s / prompt": f"{method['cost']['seconds_per_prompt']:.3f}",
                "AUC (1 gen)": _ci(one.get("auc"), one.get("auc_ci")),
            }
            if n > 1:
                row[f"TPR@1%FPR ({n} gens)"] = _ci(full.get("tpr_at_1pct_fpr"), full.get("tpr_ci"))
                row[f"AUC ({n} gens)"] = _ci(full.get("auc"), full.get("auc_ci"))
            row["n mem / not"] = f"{full['n_positive']} / {full['n_negative']}"
            tpr = one.get("tpr_at_1pct_fpr")
            ranked.append(((split, -(tpr if tpr is not None else -1.0)), row))
    splits = list(dict.fromkeys(split for (split, _), _ in ranked))  # the suite's order of splits
    ranked.sort(key=lambda item: (splits.index(item[0][0]), item[0][1]))
    return [row for _, row in ranked]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def detection_markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    suite = results["suite"]
    head = (
        f"Suite `{suite['name']}` ({', '.join(f'{k}: {p} vs {q}' for k, (p, q) in suite['sizes'].items())}); "
        f"{s['num_gens']} generations per prompt, seed {s['seed']}, {s['num_inference_steps']} steps, guidance "
        f"{s['guidance_scale']}. Chance: AUC 0.5, TPR@1%FPR 0.01. 95 % intervals: bootstrap over prompts."
    )
    return head + "\n\n" + markdown_table(detection_rows(results)) + "\n"


def write_detection_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """``report.html``: the table and one ROC plot per split with every method (escaped captions)."""

    out_dir = Path(out_dir)
    sections = [("Settings", f"<pre>{escape(detection_markdown(results).splitlines()[0])}</pre>")]
    sections.append(("Detection", table_html(detection_rows(results))))
    splits = sorted({split for m in results["methods"].values() for split in m["splits"]})
    suite = json.loads((out_dir / "suite.json").read_text()) if (out_dir / "suite.json").is_file() else None
    for split in splits:
        curves = {}
        for key in results["methods"]:
            scores = load_scores(out_dir, key, split)
            labels = results.get("labels", {}).get(split)
            if scores is None or labels is None or len(set(labels)) < 2:
                continue
            curves[key] = ([sum(g) / len(g) for g in scores], labels)
        if curves:
            sections.append(
                (f"ROC: {split}", figure_tag(roc_curves_figure(curves, split), alt=f"ROC curves, {split}"))
            )
    if suite is not None:
        for split, prompts in suite["splits"].items():
            rows = [
                {"prompt": p["prompt"], "label": p["label"], "kind": p["role"], "max SSIM": p["similarity"]}
                for p in prompts
            ]
            sections.append((f"Prompts: {split}", table_html(rows)))
    return write_html(out_dir / "report.html", "diffmem bench detection", sections)
