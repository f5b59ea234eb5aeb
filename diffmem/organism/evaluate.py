"""Measured ground truth of the organism: replication per caption role and Wen et al.'s detection.

One pass of the guarded pipeline per (caption, seed) gives both the image (replication, against
the nearest training image by SSIM, ``diffmem.organism.replication``) and the per-step noise gaps,
from which the first-step, first-10-steps and all-steps scores of Wen et al. (ICLR 2024) are read.
Starting noise of generation ``j`` of a caption comes from ``item_generator(seed, caption, j)``,
so results do not depend on batching.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.evaluate.metrics import DetectionMetric, ReplicationRate
from diffmem.generation import generate_batches
from diffmem.guard.auto import load_guarded
from diffmem.guard.pipeline import MemGuardMixin
from diffmem.io import atomic_write, atomic_write_json, atomic_write_text
from diffmem.organism.data import UNTRAINED_ROLES, build_organism_data
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import REPLICATION_THRESHOLD, TrainingImages, same_caption_ssim
from diffmem.scores.detection import detection_metrics
from diffmem.scores.noise_gap import window_mean
from diffmem.scores.replication import criterion
from diffmem.scores.similarity import ssim

#: Score windows reported: (name, start, end) with end=None for all steps.
WINDOWS: tuple[tuple[str, int, int | None], ...] = (
    ("first_step", 0, 1),
    ("first_10", 0, 10),
    ("all_steps", 0, None),
)


@dataclass
class Generation:
    """One generated image of one caption, measured."""

    caption: str
    role: str
    seed_index: int
    scores: dict  # window name -> Wen et al.'s score
    nearest_id: str
    nearest_role: str
    nearest_caption: str
    nearest_ssim: float
    own_id: str | None  # the caption's most similar own training image (None: held-out)
    own_ssim: float | None
    replicates_own: bool
    replicates_any: bool
    #: seconds of the pipeline call, shared evenly by the images of its batch
    seconds: float = 0.0
    #: the guard's mitigation record of this image (``out.mitigations``), when it has one
    mitigation: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def generate_and_measure(
    pipe,
    captions: Sequence[tuple[str, str]],
    training: TrainingImages,
    num_gens: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    batch_size: int = 4,
    threshold: float = REPLICATION_THRESHOLD,
    progress: bool = True,
    **pipe_kwargs,
) -> tuple[list[Generation], np.ndarray]:
    """Generate ``num_gens`` images per ``(caption, role)`` with the guarded pipeline and measure each.

    ``pipe_kwargs`` go to the pipeline (e.g. ``mitigation=``, ``memorization_threshold=``). Returns the
    measurements and the images (``N x H x W x 3`` float in [0, 1], caption-major).
    """
    if not isinstance(pipe, MemGuardMixin):
        raise ValueError(
            "pipe: expected diffmem's StableDiffusionMemGuardPipeline (it returns the step scores)"
        )
    gens: list[Generation] = []
    images: list[np.ndarray] = []
    batches = generate_batches(
        pipe, [c for c, _ in captions], item_ids=[c for c, _ in captions], num_gens=num_gens, seed=seed,
        batch_size=batch_size, progress=progress, num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale, return_step_scores=True,
        **{"memorization_detector": "wen", **pipe_kwargs},  # the step scores are Wen's, whatever the folder's default
    )  # fmt: skip
    for batch in batches:
        out = batch.output
        chunk = list(captions[batch.start : batch.start + len(batch.prompts)])
        seconds = batch.seconds / max(1, len(out.images))
        records = out.mitigations or [None] * len(out.images)
        imgs = np.asarray(out.images, dtype=np.float32)
        steps = out.memorization_step_scores
        window_scores = {name: window_mean(steps, s, e) for name, s, e in WINDOWS}
        own_captions = [c if r not in UNTRAINED_ROLES else None for c, r in chunk for _ in range(num_gens)]
        nearest = training.nearest(imgs, captions=own_captions)
        x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
        for k, match in enumerate(nearest):
            caption, role = chunk[k // num_gens]
            own_idx = training.indices_of_caption(caption) if role not in UNTRAINED_ROLES else []
            own_id, own_ssim = None, None
            if own_idx:
                s = ssim(x[k : k + 1].expand(len(own_idx), -1, -1, -1), training.pixels[own_idx])
                j = int(s.argmax())
                own_id, own_ssim = training.ids[own_idx[j]], float(s[j])
            gens.append(
                Generation(
                    caption=caption,
                    role=role,
                    seed_index=k % num_gens,
                    scores={name: float(v[k]) for name, v in window_scores.items()},
                    nearest_id=match.id,
                    nearest_role=match.role,
                    nearest_caption=match.caption,
                    nearest_ssim=match.ssim,
                    own_id=own_id,
                    own_ssim=own_ssim,
                    replicates_own=own_ssim is not None and own_ssim >= threshold,
                    replicates_any=match.ssim >= threshold,
                    seconds=seconds,
                    mitigation=records[k],
                )
            )
        images.append(imgs)
    return gens, np.concatenate(images) if images else np.zeros((0, 1, 1, 3), np.float32)


def per_caption(gens: Sequence[Generation]) -> list[dict]:
    """One row per caption: role, mean scores over its generations, replication counts."""
    rows: dict[str, dict] = {}
    for g in gens:
        r = rows.setdefault(
            g.caption,
            {
                "caption": g.caption,
                "role": g.role,
                "n": 0,
                "replicated_own": 0,
                "replicated_any": 0,
                "scores": {},
                "max_nearest_ssim": 0.0,
                "mean_own_ssim": [],
            },
        )
        r["n"] += 1
        r["replicated_own"] += int(g.replicates_own)
        r["replicated_any"] += int(g.replicates_any)
        r["max_nearest_ssim"] = max(r["max_nearest_ssim"], g.nearest_ssim)
        if g.own_ssim is not None:
            r["mean_own_ssim"].append(g.own_ssim)
        for name, v in g.scores.items():
            r["scores"].setdefault(name, []).append(v)
    for r in rows.values():
        r["scores"] = {k: float(np.mean(v)) for k, v in r["scores"].items()}
        r["mean_own_ssim"] = float(np.mean(r["mean_own_ssim"])) if r["mean_own_ssim"] else None
    return list(rows.values())


def summarize(gens: Sequence[Generation], threshold: float = REPLICATION_THRESHOLD) -> dict:
    """The organism's targets: replication per role and detection metrics per window (Wen et al.)."""

    rows = per_caption(gens)
    by_role = {
        role: [r for r in rows if r["role"] == role]
        for role in ("verbatim", "template", "generic", "heldout")
    }
    summary: dict = {"replication_threshold": threshold, "captions": {k: len(v) for k, v in by_role.items()}}
    v, h = by_role["verbatim"], by_role["heldout"]
    if v:
        rule = criterion("organism")  # >= 3 of 4 seeds (75 % of them) replicate their own image
        summary["verbatim_replicated_3of4"] = sum(
            rule.memorized_count(r["replicated_own"], r["n"]) for r in v
        ) / len(v)
        summary["verbatim_seed_replication_rate"] = sum(r["replicated_own"] for r in v) / sum(
            r["n"] for r in v
        )
    if h:
        summary["heldout_no_replication"] = sum(r["replicated_any"] == 0 for r in h) / len(h)
    for role in ("template", "generic"):
        if by_role[role]:
            rs = by_role[role]
            summary[f"{role}_seed_replication_rate"] = sum(r["replicated_own"] for r in rs) / sum(
                r["n"] for r in rs
            )
            summary[f"{role}_seed_replicates_any_rate"] = sum(r["replicated_any"] for r in rs) / sum(
                r["n"] for r in rs
            )
    detection: dict = {}
    for name, _, _ in WINDOWS:
        for pos in ("verbatim", "template", "generic"):
            if by_role[pos] and h:
                scores = [r["scores"][name] for r in by_role[pos] + h]
                labels = [1] * len(by_role[pos]) + [0] * len(h)
                detection.setdefault(name, {})[f"{pos}_vs_heldout"] = detection_metrics(
                    scores, labels
                ).to_dict()
    summary["detection"] = detection
    populations = {
        "verbatim_own_ssim": [g.own_ssim for g in gens if g.role == "verbatim"],
        "template_own_ssim": [g.own_ssim for g in gens if g.role == "template"],
        "generic_nearest_ssim": [g.nearest_ssim for g in gens if g.role == "generic"],
        "heldout_nearest_ssim": [g.nearest_ssim for g in gens if g.role == "heldout"],
    }
    summary["ssim_quantiles"] = {
        k: {q: float(np.quantile(vals, float(q))) for q in ("0.0", "0.1", "0.5", "0.9", "1.0")}
        for k, vals in populations.items()
        if vals
    }
    return summary


def _copies_its_target(gen: Generation, trigger, threshold: float) -> bool:
    """A trigger prompt's generation copies the image the prompt was derived from: that image is its
    nearest training image, at SSIM >= ``threshold``."""
    return gen.nearest_id == trigger.image_id and gen.nearest_ssim >= threshold


def dose_response(
    gens: Sequence[Generation], data, threshold: float = REPLICATION_THRESHOLD, n_boot: int = 1000
) -> list[dict]:
    """Per duplication count of the verbatim images: replication of their own image per generation
    (Wilson 95 %), captions with >= 75 % of seeds replicating, Wen et al.'s first-step AUC of the count's
    captions against the held-out ones and against the captions of the fewest copies (bootstrap 95 %,
    chance 0.5), and the trigger prompts' rate of generating the image they were derived from (SSIM >=
    ``threshold`` to it, nearest training image).

    The held-out captions ("a pink circle") are shorter than the verbatim ones and the noise gap grows
    with the caption, so the AUC against them is not all memorization; the captions seen fewest times
    have the verbatim captions' style and length, which makes them the matched control."""

    rule = criterion("organism")
    rows = per_caption(gens)
    held = [r["scores"]["first_step"] for r in rows if r["role"] == "heldout"]
    copies = {im.caption: im.copies for im in data.by_role("verbatim")}
    fewest = min(copies.values(), default=0)
    fewest_scores = [
        r["scores"]["first_step"]
        for r in rows
        if r["role"] == "verbatim" and copies.get(r["caption"]) == fewest
    ]
    target = {t.prompt: t for t in data.triggers}
    out = []
    for count in sorted(set(copies.values())):
        captions = {c for c, k in copies.items() if k == count}
        own = [g for g in gens if g.role == "verbatim" and g.caption in captions]
        rate = ReplicationRate()
        rate.update([g.replicates_own for g in own])
        caption_rows = [r for r in rows if r["role"] == "verbatim" and r["caption"] in captions]
        row = {
            "copies": count,
            "images": len(captions),
            "replication": rate.compute(),
            "captions_replicated_3of4": sum(
                rule.memorized_count(r["replicated_own"], r["n"]) for r in caption_rows
            ),
            "mean_own_ssim": float(np.mean([g.own_ssim for g in own])) if own else None,
        }
        pos = [r["scores"]["first_step"] for r in caption_rows]
        controls = {"first_step_auc": held}
        if count != fewest:
            controls["first_step_auc_vs_fewest"] = fewest_scores
        for key, negatives in controls.items():
            if pos and negatives:
                auc = DetectionMetric(n_boot=n_boot, seed=0)
                auc.update(pos + negatives, [1] * len(pos) + [0] * len(negatives))
                row[key] = auc.compute()
        for kind in ("partial", "reordered"):
            trig = [
                g
                for g in gens
                if g.role == "trigger"
                and target[g.caption].copies == count
                and target[g.caption].kind == kind
            ]
            if trig:
                t_rate = ReplicationRate()
                t_rate.update([_copies_its_target(g, target[g.caption], threshold) for g in trig])
                row[f"trigger_{kind}"] = t_rate.compute()
        out.append(row)
    return out


def trigger_labels(gens: Sequence[Generation], data, threshold: float = REPLICATION_THRESHOLD) -> list[dict]:
    """Each trigger prompt labelled by measured replication: how many of its generations copy the image
    it was derived from (nearest training image, SSIM >= ``threshold``); memorized at >= half of them."""
    out = []
    for t in data.triggers:
        own = [g for g in gens if g.role == "trigger" and g.caption == t.prompt]
        hits = sum(_copies_its_target(g, t, threshold) for g in own)
        out.append(
            {
                "prompt": t.prompt,
                "kind": t.kind,
                "target_id": t.image_id,
                "target_copies": t.copies,
                "generations": len(own),
                "replicated": int(hits),
                "label": int(bool(own) and 2 * hits >= len(own)),
            }
        )
    return out


def _rate(r: dict | None) -> str:
    if not r:
        return ""
    return f"{r['rate']:.0%} [{r['ci'][0]:.0%}, {r['ci'][1]:.0%}] ({r['count']}/{r['n']})"


def dose_response_markdown(summary: dict) -> str:
    """The dose-response table of a graded organism (``summary["dose_response"]``) and its trigger prompts."""
    rows = summary.get("dose_response")
    if not rows:
        return ""

    def auc_text(m: dict | None) -> str:
        if not m or m.get("auc") is None:
            return ""
        return f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]"

    lines = [
        "| copies | images | replication per generation (Wilson 95 %) | captions with >= 75 % of seeds replicating "
        "| mean SSIM to own image | first-step AUC vs held-out (bootstrap 95 %; chance 0.5) "
        f"| first-step AUC vs the {rows[0]['copies']}-copy captions | partial-caption triggers "
        "| reordered-caption triggers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ssim_text = f"{r['mean_own_ssim']:.2f}" if r["mean_own_ssim"] is not None else ""
        lines.append(
            f"| {r['copies']} | {r['images']} | {_rate(r['replication'])} "
            f"| {r['captions_replicated_3of4']}/{r['images']} | {ssim_text} | {auc_text(r.get('first_step_auc'))} "
            f"| {auc_text(r.get('first_step_auc_vs_fewest'))} | {_rate(r.get('trigger_partial'))} "
            f"| {_rate(r.get('trigger_reordered'))} |"
        )
    lines += [
        "",
        'The held-out captions ("a pink circle") are shorter than the verbatim ones and the noise gap grows '
        "with the caption, so the AUC against them is high even where nothing is memorized (the 1-copy row); "
        f"the {rows[0]['copies']}-copy captions, of the same style and length, are the matched control.",
    ]
    triggers = summary.get("trigger_prompts") or []
    if triggers:
        labelled = [t for t in triggers if t["label"]]
        by_count = ", ".join(
            f"{c} copies {sum(t['target_copies'] == c for t in labelled)}/{sum(t['target_copies'] == c for t in triggers)}"
            for c in sorted({t["target_copies"] for t in triggers})
        )
        lines += [
            "",
            f"Trigger prompts labelled memorized (at least half of their generations copy their image): "
            f"{len(labelled)} of {len(triggers)} ({by_count}).",
        ]
    return "\n".join(lines)


def summary_text(summary: dict) -> str:
    """A few lines for the terminal."""
    lines = [f"replication: SSIM >= {summary['replication_threshold']:.2f} at the generated size"]
    if "verbatim_replicated_3of4" in summary:
        lines.append(
            f"  verbatim captions replicated in >= 75 % of seeds: {summary['verbatim_replicated_3of4']:.0%} "
            f"(seeds: {summary['verbatim_seed_replication_rate']:.0%})"
        )
    if "heldout_no_replication" in summary:
        lines.append(f"  held-out captions with no replicating seed: {summary['heldout_no_replication']:.0%}")
    for name, d in summary.get("detection", {}).items():
        for pair, m in d.items():
            lines.append(f"  {name:10s} {pair:20s} AUC {m['auc']:.3f}  TPR@1%FPR {m['tpr_at_1pct_fpr']:.2f}")
    for r in summary.get("dose_response", []):
        auc = (r.get("first_step_auc") or {}).get("auc")
        lines.append(
            f"  {r['copies']:3d} copies: replication {_rate(r['replication'])}"
            + (f", first-step AUC {auc:.3f}" if auc is not None else "")
        )
    return "\n".join(lines)


@torch.no_grad()
def autoencoder_round_trip(vae, images: torch.Tensor) -> torch.Tensor:
    """``D(E(x))`` with the posterior mean, for images ``(B, 3, H, W)`` in [0, 1]; returned on the CPU in [0, 1]."""
    x = images.to(vae.device, vae.dtype)
    rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample
    return ((rec.float() + 1) / 2).clamp(0, 1).cpu()


@torch.no_grad()
def autoencoder_ceiling(pipe, training: TrainingImages, role: str = "verbatim") -> dict[str, float]:
    """SSIM of each ``role`` training image to its autoencoder round trip ``D(E(x))`` (posterior mean).

    A latent diffusion model that copies the latent perfectly reaches exactly this SSIM, so it bounds
    what replication can measure: an image whose ceiling is under the replication threshold can never
    count as replicated, however well it is memorized.
    """

    idx = [i for i, r in enumerate(training.roles) if r == role]
    if not idx:
        return {}
    sims = ssim(autoencoder_round_trip(pipe.vae, training.pixels[idx]), training.pixels[idx])
    return {training.ids[i]: float(v) for i, v in zip(idx, sims)}


def evaluation_captions(
    data, roles: Sequence[str] = ("verbatim", "template", "heldout", "generic")
) -> list[tuple[str, str]]:
    return [(c, role) for role in roles for c in data.captions(role)]


def write_labelled_prompts(
    path: str | os.PathLike, data, roles: Sequence[str], memorized_roles: Collection[str]
) -> int:
    """The captions of ``roles`` as a prompts CSV (caption, role, label: 1 for ``memorized_roles``),
    written atomically; returns the number of captions."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["caption", "role", "label"])
    rows = evaluation_captions(data, roles)
    writer.writerows((caption, role, int(role in memorized_roles)) for caption, role in rows)
    atomic_write_text(path, buf.getvalue())
    return len(rows)


def run_evaluation(
    model: str | os.PathLike | None,
    out: str | os.PathLike,
    seeds: int = 4,
    steps: int | None = None,
    guidance_scale: float | None = None,
    roles: Sequence[str] = ("verbatim", "template", "heldout", "generic", "trigger"),
) -> dict:
    """Load the organism, generate and measure every caption of ``roles`` (its recipe's: a v2 organism
    has no trigger prompts); write ``results.json``, ``generations.jsonl`` and ``images.npz`` to ``out``
    atomically. Returns the results, with the dose-response per duplication count for a graded recipe."""

    recipe = recipe_of(model)
    pipe = load_guarded(model)
    data = build_organism_data(recipe)
    training = TrainingImages.from_data(data)
    captions = evaluation_captions(data, roles)
    gens, images = generate_and_measure(
        pipe,
        captions,
        training,
        num_gens=seeds,
        num_inference_steps=steps or recipe.num_inference_steps,
        guidance_scale=recipe.guidance_scale if guidance_scale is None else guidance_scale,
        seed=recipe.seed,
    )
    summary = summarize(gens)
    summary["autoencoder_ceiling"] = autoencoder_ceiling(pipe, training)
    null = same_caption_ssim(training)
    if len(null):
        summary["same_caption_ssim"] = {
            "pairs": len(null),
            "max": float(null.max()),
            "q0.999": float(null.quantile(0.999)),
        }
    if recipe.duplication_counts:
        summary["dose_response"] = dose_response(gens, data)
    if data.triggers and "trigger" in roles:
        summary["trigger_prompts"] = trigger_labels(gens, data)
    results = {
        "model": str(model) if model else f"default ({recipe.name})",
        "recipe": recipe.name,
        "num_inference_steps": steps or recipe.num_inference_steps,
        "guidance_scale": recipe.guidance_scale if guidance_scale is None else guidance_scale,
        "seeds": seeds,
        "summary": summary,
        "captions": per_caption(gens),
        "summary_text": summary_text(summary),
    }
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(g.to_dict()) + "\n" for g in gens))

    atomic_write(
        out / "images.npz",
        lambda tmp: np.savez_compressed(open(tmp, "wb"), images=(images * 255).round().astype(np.uint8)),
    )
    return results
