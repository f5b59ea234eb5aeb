"""The main job (``diffmem demo``): guarded generation on the organism's captions, a table and a report."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.guard.auto import load_guarded
from diffmem.guard.calibration import CALIBRATION_FILE
from diffmem.io import atomic_write_json
from diffmem.modelio import default_model
from diffmem.organism.data import build_organism_data
from diffmem.organism.evaluate import evaluation_captions, generate_and_measure
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import REPLICATION_THRESHOLD, TrainingImages
from diffmem.report import escape, figure_tag, histogram_figure, img_tag, roc_figure, table_html, write_html
from diffmem.scores.detection import detection_metrics


@dataclass
class DemoResult:
    report: Path
    results: Path
    table_text: str
    summary_line: str
    threshold: float
    threshold_source: str
    model: str


def _resize_to(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def _short(text: str, n: int = 48) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def format_table(rows: list[dict]) -> str:
    """Fixed-width terminal table: caption, role, score, flag, SSIM to the nearest training image."""
    head = f"{'caption':48s}  {'role':8s}  {'score':>6s}  {'flag':4s}  {'SSIM':>5s}  nearest training image"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{_short(r['caption']):48s}  {r['role']:8s}  {r['score']:6.3f}  {'MEM' if r['flagged'] else '-':4s}  "
            f"{r['nearest_ssim']:5.2f}  {r['nearest_id']}{' (copy)' if r['replicated'] else ''}"
        )
    return "\n".join(lines)


def write_demo_report(
    path: str | os.PathLike,
    rows: list[dict],
    images: np.ndarray,
    nearest_images: np.ndarray,
    threshold: float,
    threshold_source: str,
    replication_threshold: float,
    model_label: str,
) -> Path:
    """The HTML report: summary, table, image pairs, score histogram per role, ROC, SSIM histogram."""

    roles = [r for r in ("verbatim", "template", "generic", "heldout") if any(x["role"] == r for x in rows)]
    flagged = {role: sum(r["flagged"] for r in rows if r["role"] == role) for role in roles}
    counts = {role: sum(r["role"] == role for r in rows) for role in roles}
    summary_text = (
        f"Model: {model_label}. Flag threshold {threshold:.3f} ({threshold_source}); flagged: "
        + ", ".join(f"{role} {flagged[role]}/{counts[role]}" for role in roles)
        + f". A generation replicates a training image when their SSIM >= {replication_threshold:.2f}."
    )
    summary = f"<p>{escape(summary_text)}</p>"
    table = table_html(
        [
            {
                "caption": r["caption"],
                "role": r["role"],
                "score (first step)": r["score"],
                "flag": "MEMORIZED" if r["flagged"] else "",
                "SSIM to nearest": r["nearest_ssim"],
                "nearest training image": r["nearest_id"],
            }
            for r in rows
        ]
    )
    cells = []
    for r, gen, near in zip(rows, images, nearest_images):
        flag = '<span class="flag">MEMORIZED</span> ' if r["flagged"] else ""
        cells.append(
            '<div class="cell"><div style="display:flex;gap:4px">'
            + img_tag(gen, alt=f"generated: {r['caption']}")
            + img_tag(near, alt=f"nearest training image {r['nearest_id']}")
            + f'</div><div class="cap">{flag}{escape(r["caption"])}<br>'
            + escape(
                f"{r['role']} · score {r['score']:.3f} · SSIM {r['nearest_ssim']:.2f} to {r['nearest_id']}"
            )
            + "</div></div>"
        )
    grid = (
        '<p>Left: generated; right: its nearest training image.</p><div class="grid">'
        + "".join(cells)
        + "</div>"
    )
    by_role = {role: [r["score"] for r in rows if r["role"] == role] for role in roles}
    hist = figure_tag(
        histogram_figure(by_role, "Wen et al. score, first step", threshold=threshold), alt="score histogram"
    )
    ssim_hist = figure_tag(
        histogram_figure(
            {role: [r["nearest_ssim"] for r in rows if r["role"] == role] for role in roles},
            "SSIM to the nearest training image",
            threshold=replication_threshold,
        ),
        alt="SSIM histogram",
    )
    pos = [r for r in rows if r["role"] in ("verbatim", "template")]
    neg = [r for r in rows if r["role"] == "heldout"]
    if pos and neg:
        roc = figure_tag(
            roc_figure(
                [r["score"] for r in pos + neg],
                [1] * len(pos) + [0] * len(neg),
                title="verbatim + template vs held-out",
            ),
            alt="ROC curve",
        )
    else:
        roc = "<p>(needs memorized and held-out captions)</p>"
    return write_html(
        path,
        "diffmem demo: memorization on the model organism",
        [
            ("Summary", summary),
            ("Captions", table),
            ("Generated images and their nearest training images", grid),
            ("Score histogram per role", hist),
            ("ROC curve", roc),
            ("Replication: SSIM to the nearest training image", ssim_hist),
        ],
    )


def run_demo(
    model: str | os.PathLike | None = None,
    out: str | os.PathLike = "runs/demo",
    seeds: int = 1,
    steps: int | None = None,
    per_role: int | None = None,
    threshold: float | None = None,
    progress: bool = True,
) -> DemoResult:
    """Generate the organism's verbatim, template and held-out captions with the guarded pipeline, measure
    each image and write ``report.html`` + ``results.json`` to ``out``."""

    model_dir = str(model) if model is not None else default_model()
    pipe = load_guarded(model)
    model_label = model_dir or "untrained tiny fallback model (the organism's weights are missing)"
    recipe = recipe_of(model_dir)
    data = build_organism_data(recipe)
    training = TrainingImages.from_data(data)
    captions = evaluation_captions(data, ("verbatim", "template", "heldout"))
    if per_role is not None:
        seen: dict[str, int] = {}
        kept = []
        for c, r in captions:
            seen[r] = seen.get(r, 0) + 1
            if seen[r] <= per_role:
                kept.append((c, r))
        captions = kept
    gen_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if gen_size != recipe.image_size:
        # a model of another size: compare at the training images' size
        gens, images = _generate_resized(
            pipe, captions, training, seeds, steps or recipe.num_inference_steps, recipe
        )
    else:
        gens, images = generate_and_measure(
            pipe,
            captions,
            training,
            num_gens=seeds,
            num_inference_steps=steps or recipe.num_inference_steps,
            guidance_scale=recipe.guidance_scale,
            seed=recipe.seed,
            progress=progress,
        )
    scores = [g.scores["first_step"] for g in gens]
    source = "given with --threshold"
    if threshold is None:
        calib = pipe.calibration
        why = "the model has no calibration file"
        if calib is not None:
            why = calib.mismatch(
                window=(0, 1),
                num_inference_steps=steps or recipe.num_inference_steps,
                scheduler=type(pipe.scheduler).__name__,
                height=gen_size,
                width=gen_size,
                guidance_scale=recipe.guidance_scale,
            )
        if why is None:
            threshold, source = calib.memorization_threshold, f"the model's calibration ({CALIBRATION_FILE})"
        else:
            labels = [int(g.role != "heldout") for g in gens]
            if 0 < sum(labels) < len(labels):
                threshold = detection_metrics(scores, labels).threshold
                source = f"calibrated on this run's captions ({why})"
            else:
                threshold, source = float(np.median(scores)), f"median score ({why})"
    rows = [
        {
            "caption": g.caption,
            "role": g.role,
            "seed_index": g.seed_index,
            "score": g.scores["first_step"],
            "scores": g.scores,
            "flagged": g.scores["first_step"] >= threshold,
            "nearest_id": g.nearest_id,
            "nearest_ssim": g.nearest_ssim,
            "replicated": g.replicates_any,
        }
        for g in gens
    ]
    index = {id_: i for i, id_ in enumerate(training.ids)}
    nearest_images = training.pixels[[index[g.nearest_id] for g in gens]].permute(0, 2, 3, 1).numpy()
    out = Path(out)
    report = write_demo_report(
        out / "report.html",
        rows,
        images,
        nearest_images,
        threshold,
        source,
        REPLICATION_THRESHOLD,
        model_label,
    )
    results = atomic_write_json(
        out / "results.json",
        {"model": model_label, "threshold": threshold, "threshold_source": source, "rows": rows},
    )
    pos = [r for r in rows if r["role"] == "verbatim"]
    neg = [r for r in rows if r["role"] == "heldout"]
    line = (
        f"flagged {sum(r['flagged'] for r in pos)}/{len(pos)} verbatim, "
        f"{sum(r['flagged'] for r in rows if r['role'] == 'template')}/{sum(r['role'] == 'template' for r in rows)} "
        f"template, {sum(r['flagged'] for r in neg)}/{len(neg)} held-out generations; "
        f"replicated: {sum(r['replicated'] for r in pos)}/{len(pos)} verbatim, "
        f"{sum(r['replicated'] for r in neg)}/{len(neg)} held-out (threshold {threshold:.3f}, {source})"
    )
    return DemoResult(report, results, format_table(rows), line, threshold, source, model_label)


def _generate_resized(pipe, captions, training, seeds, steps, recipe):
    """``generate_and_measure`` for a model whose images are not the training size (the tiny fallback)."""

    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    small = _resize_to(training.pixels.permute(0, 2, 3, 1).numpy(), size)
    small_training = TrainingImages(
        torch.from_numpy(small).permute(0, 3, 1, 2), training.ids, training.captions, training.roles
    )
    gens, images = generate_and_measure(
        pipe, captions, small_training, num_gens=seeds, num_inference_steps=steps,
        guidance_scale=recipe.guidance_scale, seed=recipe.seed,
    )  # fmt: skip
    return gens, _resize_to(images, recipe.image_size)
