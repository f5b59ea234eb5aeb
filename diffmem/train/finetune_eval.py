"""What a fine-tune on the duplicated-subset ground truth memorized, and what it cost in quality.

The model is fine-tuned on a set written by
:func:`diffmem.organism.finetune_data.build_duplicated_finetune_set` (a known subset of the images repeats
``repeats`` times, each distinct image has its own caption). :func:`evaluate_finetune` measures, with every
random choice drawn from ``seed`` (generation ``j`` of caption ``c`` starts from the noise
``item_generator(seed, c, j)``, :func:`diffmem.generation.initial_latents`, so results do not depend on
batching):

1. **replication** (Somepalli et al., CVPR 2023; Wen et al., ICLR 2024): ``seeds_per_caption``
   generations from the caption of every distinct image, through the organism's generation path
   (:func:`diffmem.organism.evaluate.generate_and_measure`) and its one replication definition
   (:mod:`diffmem.organism.replication`): a generation replicates when ``SSIM >= REPLICATION_THRESHOLD``
   (0.7) to its caption's own training image (``own``), or to its nearest image of the fine-tuning set
   (``any``). The rate over the duplicated images, with its Wilson 95 % interval, against the same rate
   over the images seen once (the comparison level), and their difference (Newcombe's interval);
2. **caption fidelity** on the organism's generic and held-out captions (:mod:`diffmem.organism.fidelity`:
   the share of generations whose colour and shape the caption classifier reads as named), with Wilson
   95 % intervals;
3. **first-step detection**: Wen et al.'s noise gap ``||eps(x_T, T, c) - eps(x_T, T, empty)||_2`` at the
   first denoising step (the registry's ``wen`` detector, ``steps=1``), mean over the seeds of a caption,
   the duplicated captions (positives) against as many captions seen once (negatives, drawn from
   ``seed``): AUC with its bootstrap 95 % interval, chance 0.5.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.data import load_rgb, open_dataset
from diffmem.detectors import get_detector
from diffmem.evaluate.metrics import DetectionMetric, ReplicationRate
from diffmem.guard.auto import as_guarded
from diffmem.modelio import model_resolution, model_settings
from diffmem.organism.evaluate import generate_and_measure, per_caption
from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier
from diffmem.organism.finetune_data import MANIFEST_FILE, FinetuneSet
from diffmem.organism.replication import REPLICATION_THRESHOLD, TrainingImages
from diffmem.records import BadRow
from diffmem.scores.solidmark import binomial_ci, difference_ci
from diffmem.seeding import derive_seed

__all__ = [
    "FinetuneEvaluation",
    "FinetuneTruth",
    "evaluate_finetune",
    "check_set_size",
    "image_bootstrap_ci",
    "read_finetune_set",
    "replication_rates",
]

#: Roles of the fine-tuning set's images in :class:`TrainingImages` (and of their captions in the generations).
DUPLICATED, SINGLE = "duplicated", "single"
_MANIFEST_KEYS = ("duplicated_ids", "heldout_captions", "generic_captions")
_DETECTOR = ("wen", {"steps": 1})


# ------------------------------------------------------------------------------------------ the set


@dataclass(frozen=True)
class FinetuneTruth:
    """A fine-tuning set read back: what was written, the distinct images and each one's copies."""

    finetune: FinetuneSet
    training: TrainingImages  # the distinct images, roles ``duplicated`` / ``single``
    copies: dict[str, int]  # image id -> training rows that show it
    settings: dict  # the manifest's settings

    @property
    def single_ids(self) -> list[str]:
        dup = set(self.finetune.duplicated_ids)
        return [i for i in self.finetune.image_ids if i not in dup]


def _not_a_set(path: Path, problem: str) -> ValueError:
    return ValueError(
        f"{path}: {problem}; expected a fine-tuning set written by "
        "diffmem.organism.finetune_data.build_duplicated_finetune_set (an image folder with metadata.jsonl "
        f"columns image_id, memorized, copies, and {MANIFEST_FILE} with {', '.join(_MANIFEST_KEYS)})"
    )


def read_finetune_set(folder: str | os.PathLike) -> FinetuneTruth:
    """Read a fine-tuning set; ``ValueError`` naming the file for a folder that is not one."""

    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise _not_a_set(manifest_path, "not found")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _not_a_set(manifest_path, f"not readable JSON ({err})") from None
    missing = [
        k for k in _MANIFEST_KEYS if not isinstance(manifest, dict) or not isinstance(manifest.get(k), list)
    ]
    if missing:
        raise _not_a_set(manifest_path, f"no list {', '.join(missing)}")
    empty = [k for k in ("heldout_captions", "generic_captions") if not manifest[k]]
    if empty:
        raise _not_a_set(manifest_path, f"{' and '.join(empty)} empty (caption fidelity needs them)")
    try:
        rows = list(open_dataset(folder, argument=str(folder)))
    except (FileNotFoundError, ValueError) as err:
        raise _not_a_set(folder, str(err)) from None
    bad = [r for r in rows if isinstance(r, BadRow)]
    if bad:
        raise _not_a_set(folder, f"{len(bad)} unreadable rows, the first: {bad[0].detail}")
    first: dict[str, Any] = {}
    copies: dict[str, int] = {}
    for r in rows:
        image_id = r.extra.get("image_id")
        if image_id is None:
            raise _not_a_set(folder / "metadata.jsonl", f"row {r.row} has no image_id")
        first.setdefault(str(image_id), r)
        copies[str(image_id)] = copies.get(str(image_id), 0) + 1
    image_ids = list(first)
    duplicated = [str(i) for i in manifest["duplicated_ids"]]
    unknown = sorted(set(duplicated) - set(image_ids))
    if unknown:
        raise _not_a_set(manifest_path, f"duplicated ids {', '.join(unknown[:3])} are not in metadata.jsonl")
    captions = {i: first[i].caption for i in image_ids}
    pixels = np.stack([np.asarray(load_rgb(first[i].image)) for i in image_ids])
    dup = set(duplicated)
    training = TrainingImages(
        pixels,
        image_ids,
        [captions[i] for i in image_ids],
        [DUPLICATED if i in dup else SINGLE for i in image_ids],
    )
    finetune = FinetuneSet(
        folder,
        image_ids,
        duplicated,
        captions,
        [str(c) for c in manifest["heldout_captions"]],
        [str(c) for c in manifest["generic_captions"]],
        len(rows),
    )
    return FinetuneTruth(finetune, training, copies, dict(manifest.get("settings", {})))


# ------------------------------------------------------------------------------------------ helpers


def check_set_size(pipe, truth: FinetuneTruth) -> None:
    """Refuse a set whose images are not the size ``pipe`` generates."""

    height, width = model_resolution(pipe)
    have = tuple(truth.training.pixels.shape[-2:])
    if have != (height, width):
        raise ValueError(
            f"{truth.finetune.folder}: its images are {have[0]}x{have[1]} px but the model generates "
            f"{height}x{width} px; build the fine-tuning set at image_size={height}"
        )


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")


def _generate(pipe, captions, training, *, seeds, steps, guidance_scale, seed, batch_size, progress):
    """The organism's generation path, ``batch_size`` images per pipeline call (whole captions)."""

    return generate_and_measure(
        pipe,
        captions,
        training,
        num_gens=seeds,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=max(1, batch_size // seeds),
        progress=progress,
        memorization_threshold=0.0,  # scores only: no calibration enters, nothing is mitigated
    )


def _first_step_scores(pipe, captions, *, seeds, steps, guidance_scale, seed, batch_size, progress):
    """The registry's first-step ``wen`` detector: ``[len(captions), seeds]``, noise of caption ``c`` from
    ``item_generator(seed, c, j)`` (the generations' own starting noise)."""

    name, options = _DETECTOR
    return get_detector(name, options).score(
        pipe,
        list(captions),
        num_gens=seeds,
        seed=seed,
        item_ids=list(captions),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        batch_size=max(1, batch_size // seeds),
        progress=progress,
    )


def _fidelity(classifier, images: np.ndarray, captions: Sequence[str]) -> dict:
    """:func:`~diffmem.organism.fidelity.caption_fidelity` with Wilson 95 % intervals of its shares."""

    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    out = caption_fidelity(classifier, x, list(captions)).as_dict()
    for key in ("colour", "shape", "both"):
        out[f"{key}_ci"] = list(binomial_ci(round(out[key] * out["n"]), out["n"]))
    return out


def _fidelity_captions(truth: FinetuneTruth) -> list[tuple[str, str]]:
    return [(c, "generic") for c in truth.finetune.generic_captions] + [
        (c, "heldout") for c in truth.finetune.heldout_captions
    ]


def image_bootstrap_ci(
    counts: Sequence[int], ns: Sequence[int], seed: int = 0, draws: int = 2000
) -> list[float]:
    """95 % percentile interval of ``sum(counts) / sum(ns)`` with the images resampled (``draws`` times, from
    ``seed``): the generations of one image are not independent, so the interval is over images, not
    generations (Wilson's over generations is narrower)."""
    c, n = np.asarray(counts, float), np.asarray(ns, float)
    if len(c) == 0 or n.sum() == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(derive_seed(seed, "image-bootstrap"))
    picks = rng.integers(0, len(c), size=(draws, len(c)))
    rates = c[picks].sum(1) / np.maximum(n[picks].sum(1), 1.0)
    return [float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))]


def replication_rates(gens: Sequence, truth: FinetuneTruth) -> tuple[dict, list[dict]]:
    """Replication of the fine-tuning set's images from measured generations of their captions.

    ``gens``: :class:`~diffmem.organism.evaluate.Generation` records of captions of ``truth``. Returns
    ``({"duplicated": {"own", "any"}, "single": {...}, "difference": {...}}, per_image)``: each rate is the
    share of generations that replicate (``own``: SSIM >= 0.7 to the caption's own image; ``any``: to the
    nearest image of the set) with its Wilson 95 % interval over generations (``ci``) and its bootstrap
    interval over images (``ci_images``, :func:`image_bootstrap_ci`); ``difference`` is duplicated - single
    (``own``) with Newcombe's interval; ``per_image`` one row per distinct image with its counts.
    """

    by_caption = {c: i for i, c in truth.finetune.captions.items()}
    dup = set(truth.finetune.duplicated_ids)
    rates = {group: {"own": ReplicationRate(), "any": ReplicationRate()} for group in (DUPLICATED, SINGLE)}
    replicated_ids: dict[str, set[str]] = {}
    for g in gens:
        if g.caption not in by_caption:
            raise ValueError(f"replication_rates: {g.caption!r} is not a caption of {truth.finetune.folder}")
        group = DUPLICATED if by_caption[g.caption] in dup else SINGLE
        rates[group]["own"].update([g.replicates_own])
        rates[group]["any"].update([g.replicates_any])
        if g.replicates_any:
            replicated_ids.setdefault(g.caption, set()).add(g.nearest_id)
    per_image = []
    for row in per_caption(gens):
        image_id = by_caption[row["caption"]]
        per_image.append(
            {
                "image_id": image_id,
                "caption": row["caption"],
                "duplicated": image_id in dup,
                "copies": truth.copies[image_id],
                "n": row["n"],
                "replicated_own": row["replicated_own"],
                "replicated_any": row["replicated_any"],
                "mean_own_ssim": row["mean_own_ssim"],
                "max_nearest_ssim": row["max_nearest_ssim"],
                "replicated_ids": sorted(replicated_ids.get(row["caption"], ())),
            }
        )
    out: dict = {
        group: {kind: metric.compute() for kind, metric in kinds.items()} for group, kinds in rates.items()
    }
    for group in (DUPLICATED, SINGLE):
        rows = [r for r in per_image if r["duplicated"] == (group == DUPLICATED)]
        for kind in ("own", "any"):
            out[group][kind]["ci_images"] = image_bootstrap_ci(
                [r[f"replicated_{kind}"] for r in rows], [r["n"] for r in rows]
            )
    d, s = out[DUPLICATED]["own"], out[SINGLE]["own"]
    diff, low, high = difference_ci(d["count"], d["n"], s["count"], s["n"])
    out["difference"] = {"difference": diff, "ci": [low, high], "of": "duplicated - single, own"}
    return out, per_image


# ------------------------------------------------------------------------------------------ evaluation


@dataclass
class FinetuneEvaluation:
    """The measurements of one fine-tuned model on its fine-tuning set (see the module doc)."""

    settings: dict
    finetune_set: dict
    replication: dict  # duplicated / single: own / any rates with Wilson intervals; their difference
    per_image: list[dict]
    fidelity: dict  # generic / heldout / all: caption_fidelity's shares with Wilson intervals
    detection: dict  # first-step AUC (bootstrap interval, chance 0.5) and the per-caption scores
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary_text(self) -> str:
        """A few lines for the terminal."""

        def rate(r: dict) -> str:
            return f"{r['rate']:.1%} [{r['ci'][0]:.1%}, {r['ci'][1]:.1%}] ({r['count']}/{r['n']})"

        rep, fid, det = self.replication, self.fidelity, self.detection
        lines = [
            f"replication (SSIM >= {self.settings['replication_threshold']} to the caption's own image):",
            f"  duplicated images: {rate(rep[DUPLICATED]['own'])}",
            f"  images seen once:  {rate(rep[SINGLE]['own'])}",
        ]
        for name in ("generic", "heldout"):
            f = fid[name]
            lines.append(
                f"caption fidelity, {name}: {f['both']:.1%} [{f['both_ci'][0]:.1%}, {f['both_ci'][1]:.1%}]"
            )
        if det.get("auc") is not None:
            lines.append(
                f"first-step detection AUC: {det['auc']:.3f} [{det['auc_ci'][0]:.3f}, {det['auc_ci'][1]:.3f}] "
                f"(chance {det['chance_auc']})"
            )
        return "\n".join(lines)


def evaluate_finetune(
    pipe,
    folder: str | os.PathLike,
    *,
    seeds_per_caption: int = 4,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    seed: int = 0,
    negatives: int | None = None,
    batch_size: int = 32,
    classifier=None,
    progress: bool = False,
) -> FinetuneEvaluation:
    """Replication, caption fidelity and first-step detection of ``pipe`` on the fine-tuning set ``folder``.

    ``negatives``: captions seen once scored against the duplicated ones (default: as many, drawn from
    ``seed``); ``batch_size``: images per pipeline call; ``classifier``: the caption classifier (default
    ``weights/diffmem-caption-classifier``). Images are generated at the model's own size.
    """

    start = time.perf_counter()
    _check_int("seeds_per_caption", seeds_per_caption, 1)
    _check_int("num_inference_steps", num_inference_steps, 1)
    _check_int("batch_size", batch_size, 1)
    truth = read_finetune_set(folder)
    pipe = as_guarded(pipe)
    check_set_size(pipe, truth)
    fs = truth.finetune
    dup_ids, single_ids = fs.duplicated_ids, truth.single_ids
    if negatives is None:
        negatives = min(len(dup_ids), len(single_ids))
    _check_int("negatives", negatives, 0)
    if negatives > len(single_ids):
        raise ValueError(
            f"negatives: {negatives} asked, but {folder} has only {len(single_ids)} images seen once"
        )
    classifier = classifier if classifier is not None else load_caption_classifier()
    common = dict(
        seeds=seeds_per_caption,
        steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )

    # 1. replication: every caption of the set
    set_captions = [(fs.captions[i], role) for i, role in zip(fs.image_ids, truth.training.roles)]
    gens, _ = _generate(pipe, set_captions, truth.training, **common)
    replication, per_image = replication_rates(gens, truth)
    t_replication = time.perf_counter()

    # 2. caption fidelity: generic and held-out captions
    fid_captions = _fidelity_captions(truth)
    _, images = _generate(pipe, fid_captions, truth.training, **common)
    labels = [c for c, _ in fid_captions for _ in range(seeds_per_caption)]
    roles = np.array([r for _, r in fid_captions for _ in range(seeds_per_caption)])
    fidelity = {
        name: _fidelity(classifier, images[roles == name], [c for c, r in zip(labels, roles) if r == name])
        for name in ("generic", "heldout")
        if (roles == name).any()
    }
    fidelity["all"] = _fidelity(classifier, images, labels)
    t_fidelity = time.perf_counter()

    # 3. first-step detection: duplicated captions against as many drawn from the ones seen once
    rng = np.random.default_rng(derive_seed(seed, "finetune-eval", "negatives"))
    neg_ids = [single_ids[k] for k in sorted(rng.choice(len(single_ids), size=negatives, replace=False))]
    scored_ids = list(dup_ids) + neg_ids
    detection: dict = {"detector": {"name": _DETECTOR[0], **_DETECTOR[1]}}
    if scored_ids:
        scores = _first_step_scores(pipe, [fs.captions[i] for i in scored_ids], **common)
        per_caption_score = scores.mean(dim=1)
        metric = DetectionMetric(seed=seed)
        metric.update(per_caption_score, [1] * len(dup_ids) + [0] * len(neg_ids))
        detection.update(metric.compute())
        detection["scores"] = {i: float(s) for i, s in zip(scored_ids, per_caption_score)}
        detection["negative_ids"] = neg_ids
    score_of = detection.get("scores", {})
    for row in per_image:
        row["first_step_score"] = score_of.get(row["image_id"])
    end = time.perf_counter()
    return FinetuneEvaluation(
        settings={
            "seeds_per_caption": seeds_per_caption,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "negatives": negatives,
            "batch_size": batch_size,
            "replication_threshold": REPLICATION_THRESHOLD,
            **model_settings(pipe),
        },
        finetune_set={
            "folder": str(fs.folder),
            "settings": truth.settings,
            "images": len(fs.image_ids),
            "duplicated": len(dup_ids),
            "rows": fs.rows,
            "generic_captions": len(fs.generic_captions),
            "heldout_captions": len(fs.heldout_captions),
        },
        replication=replication,
        per_image=per_image,
        fidelity=fidelity,
        detection=detection,
        seconds={
            "replication": t_replication - start,
            "fidelity": t_fidelity - t_replication,
            "detection": end - t_fidelity,
            "total": end - start,
        },
    )
