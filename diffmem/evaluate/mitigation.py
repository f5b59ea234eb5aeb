"""The mitigation evaluator: every mitigation on the organism's memorized, trigger and general prompts.

Two scenarios, as MemBench (Hong et al., TMLR 2025) measures a mitigation. For each mitigation (and
``none``, the baseline of the same run):

* **memorized and trigger prompts**: the memorized captions (verbatim and template) and trigger prompts
  (never trained on, measured to copy: the suite's ``triggers`` split), ``num_gens`` generations each,
  mitigated where the guard flags them (the model's calibration): the share of images that still
  replicate a memorized training image (SSIM >= 0.7, :data:`~diffmem.scores.replication.PRESETS`
  ``"organism"``) with its Wilson 95 % interval, the share of memorized captions still memorized (>= 3 of
  4 generations), and the seconds the mitigation added per image;
* **general prompts** (held-out and generic captions, "a <colour> <shape>"), what the mitigation costs an
  ordinary generation, twice: *as deployed* (mitigated only where the guard flags, so the cost falls on
  false flags; the flagged share is the guard's false-positive rate) and *forced on* every image
  (``mitigation_threshold=0``). Quality: caption fidelity (the organism's caption classifier, colour and
  shape right) and the SSIM of each image to the unmitigated one from the same noise. (MemBench scores
  general prompts with CLIP and an aesthetic model on SD; the organism's classifier is its exact
  counterpart for colour x shape captions.)

Per-image rows are cached as ``mitigation/<key>.json`` (atomically), so a rerun resumes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from diffmem.evaluate.localization import calibrated_nemo
from diffmem.evaluate.metrics import ReplicationRate
from diffmem.evaluate.report import markdown_table
from diffmem.evaluate.suites import MEMORIZED_ROLES, LabelledPrompt, Suite
from diffmem.generation import generate
from diffmem.io import atomic_write, atomic_write_json
from diffmem.mitigations.nemo import NeMoMitigation
from diffmem.modelio import model_settings
from diffmem.organism.fidelity import caption_fidelity, load_caption_classifier
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import organism_training_images
from diffmem.report import escape, table_html, write_html
from diffmem.scores.replication import criterion
from diffmem.scores.similarity import ssim

__all__ = ["evaluate_mitigations", "mitigation_markdown", "write_mitigation_report"]


def _generate(pipe, prompts, ids, *, num_gens, seed, steps, guidance_scale, batch_size, **kwargs):
    """Images ``[n * num_gens, H, W, 3]``, mitigation reports, seconds and flags (:func:`diffmem.generation.generate`)."""
    images, batches = generate(
        pipe, prompts, item_ids=ids, num_gens=num_gens, seed=seed, batch_size=batch_size,
        num_inference_steps=steps, guidance_scale=guidance_scale, **kwargs,
    )  # fmt: skip
    reports, flags = [], []
    for batch in batches:
        n = len(batch.images)
        reports += batch.output.mitigations or [{} for _ in range(n)]
        flags += batch.output.memorized or [False] * n
    return images, reports, sum(b.seconds for b in batches), flags


def _plain_clean(pipe, clean, settings, cache: Path) -> tuple[torch.Tensor, dict]:
    """The unmitigated images of the clean captions ``[n, 3, H, W]`` and what the guard recorded of them
    (``flagged`` per image at the run's threshold, ``seconds``): the general scenario of ``none``. Cached
    as ``plain_clean.npy`` / ``plain_clean.json``."""
    path = cache / "plain_clean.npy"
    meta = cache / "plain_clean.json"
    if path.is_file() and meta.is_file():
        record = json.loads(meta.read_text())
        if record.get("settings") == settings:
            return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2), record
    images, reports, seconds, flags = _generate(
        pipe,
        [p.prompt for p in clean],
        [p.id for p in clean],
        num_gens=settings["num_gens"],
        seed=settings["seed"],
        steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        batch_size=settings["batch_size"],
        memorization_threshold=settings["threshold"],  # flags only: no mitigation, the images are unchanged
    )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, images)

    atomic_write(path, write)
    record = {"settings": settings, "flagged": _per_image(reports, flags)[0], "seconds": seconds}
    atomic_write_json(meta, record)
    return torch.from_numpy(images).permute(0, 3, 1, 2), record


def organism_nemo(pipe, reference_prompts: list[str], progress: bool = True):
    """NeMo as deployed on a model of its own: value statistics of ``reference_prompts`` and its threshold
    calibrated on them (mean + 1 std of the criterion's score, NeMo's rule), each flagged prompt localized."""

    nemo = calibrated_nemo(pipe, reference_prompts, progress=progress)
    return NeMoMitigation(stats=nemo.stats, config=nemo.config)


def _fidelity_and_similarity(images, captions: list[str], plain) -> tuple[list[float], list[float]]:
    """Per image: caption fidelity (both attributes right) and SSIM to the unmitigated image ``plain``."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    classifier = load_caption_classifier()
    fidelity = [caption_fidelity(classifier, x[i : i + 1], captions[i : i + 1]).both for i in range(len(x))]
    return fidelity, ssim(x, plain).tolist()


def _per_image(reports, flags) -> tuple[list[bool], list[float]]:
    """The first-step flag (before mitigation) where a mitigation ran, else the call's own flag; and the
    seconds a mitigation added to each image."""
    flagged = [bool(r["flagged"]) if "flagged" in r else bool(f) for r, f in zip(reports, flags)]
    added = [float(r.get("seconds", 0.0)) if r.get("action", "none") != "none" else 0.0 for r in reports]
    return flagged, added


def _rows_for(key, mitigation, pipe, copying, general, settings, plain, plain_record, cache: Path):
    """Per-image rows of one mitigation (cached): ``copying`` are the memorized and trigger prompts,
    ``general`` the general ones, ``plain`` their unmitigated images (with ``plain_record``, what the guard
    recorded of them: the general scenario of ``none``)."""

    path = cache / f"{key}.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("settings") == settings:
            return data
    common = dict(
        num_gens=settings["num_gens"],
        seed=settings["seed"],
        steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        batch_size=settings["batch_size"],
    )
    deployed = {"memorization_threshold": settings["threshold"]}
    if mitigation is not None:
        deployed["mitigation"] = mitigation
    images, reports, seconds, flags = _generate(
        pipe, [p.prompt for p in copying], [p.id for p in copying], **common, **deployed
    )
    nearest = organism_training_images(recipe=recipe_of(pipe)).of_roles(MEMORIZED_ROLES).nearest(images)
    flagged, added = _per_image(reports, flags)
    captions = [p.prompt for p in general for _ in range(settings["num_gens"])]
    general_rows = {}
    for scenario, extra in (("deployed", {}), ("forced", {"mitigation_threshold": 0.0})):
        if mitigation is None and scenario == "forced":  # nothing to force: the deployed rows
            general_rows[scenario] = general_rows["deployed"]
            continue
        if mitigation is None:  # no mitigation: the plain images, generated once with their flags
            g_images = plain.permute(0, 2, 3, 1).numpy()
            g_flagged, g_seconds = plain_record["flagged"], plain_record["seconds"]
        else:
            g_images, g_reports, g_seconds, g_flags = _generate(
                pipe, [p.prompt for p in general], [p.id for p in general], **common, **deployed, **extra
            )
            g_flagged = _per_image(g_reports, g_flags)[0]
        fidelity, similarity = _fidelity_and_similarity(g_images, captions, plain)
        general_rows[scenario] = {
            "fidelity": fidelity,
            "ssim_to_plain": similarity,
            "flagged": g_flagged,
            "seconds": g_seconds,
        }
    data = {
        "settings": settings,
        "copying": {
            "ids": [p.id for p in copying],
            "roles": [p.role for p in copying],
            "ssim": [m.ssim for m in nearest],
            "flagged": flagged,
            "added_seconds": added,
            "seconds": seconds,
        },
        "general": {"ids": [p.id for p in general], **general_rows},
    }
    atomic_write_json(path, data)
    return data


def _rate(hits) -> dict:
    rate = ReplicationRate()
    rate.update(torch.as_tensor(hits, dtype=torch.bool))
    return rate.compute()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def evaluate_mitigations(
    pipe,
    suite: Suite,
    methods: list[tuple[str, dict, Any]],
    out_dir: str | Path,
    *,
    triggers: Sequence[LabelledPrompt] = (),
    num_gens: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    threshold: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"settings", "methods": {key: {...}}}`` (module docstring); ``methods`` are ``(name, options,
    Mitigation)``, ``none`` is added first; ``triggers``: trigger prompts measured to copy."""

    if suite.name != "organism":
        raise ValueError(
            "--suite: the mitigation bench measures replication on the organism's training images; use --suite organism"
        )
    if threshold is None:
        calibration = pipe.calibration
        if calibration is None:
            raise ValueError("the model has no calibration: pass --threshold (the first-step flag threshold)")
        threshold = calibration.memorization_threshold
    split = suite.splits["memorized-vs-clean"]
    memorized = [p for p in split if p.label == 1]
    general = [p for p in split if p.label == 0]
    settings = {
        "version": 2,  # 2: the two scenarios (rows of version 1 are recomputed)
        "num_gens": num_gens,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "threshold": threshold,
        "triggers": [p.id for p in triggers],
        **model_settings(pipe),
    }
    cache = Path(out_dir) / "mitigation"
    rule = criterion("organism")
    plain, plain_record = _plain_clean(pipe, general, settings, cache)
    copying = [*memorized, *triggers]
    n_mem = len(memorized) * num_gens
    results: dict[str, Any] = {}
    for key, options, mitigation in tqdm(
        [("none", {}, None), *methods], desc="mitigations", disable=not progress
    ):
        name = key if not options else f"{key}-" + "-".join(f"{k}={v}" for k, v in options.items())
        rows = _rows_for(name, mitigation, pipe, copying, general, settings, plain, plain_record, cache)
        sims = torch.tensor(rows["copying"]["ssim"])
        flagged = rows["copying"]["flagged"]
        deployed, forced = rows["general"]["deployed"], rows["general"]["forced"]
        results[name] = {
            "config": {} if mitigation is None else mitigation.config(),
            "replication_images": _rate(rule.replicates(sims[:n_mem])),
            "memorized_prompts": _rate(rule.memorized(sims[:n_mem].view(len(memorized), num_gens))),
            "replication_triggers": _rate(rule.replicates(sims[n_mem:])) if triggers else None,
            "flagged_share": _mean(flagged[:n_mem]),
            "added_seconds_per_image": _mean(rows["copying"]["added_seconds"]),
            # general prompts, mitigation forced on every image (the keys of version 1)
            "clean_fidelity": _mean(forced["fidelity"]),
            "clean_ssim_to_unmitigated": _mean(forced["ssim_to_plain"]),
            # general prompts, as deployed: mitigated where flagged (false flags)
            "general_deployed": {
                "flagged": _rate(deployed["flagged"]),
                "fidelity": _mean(deployed["fidelity"]),
                "ssim_to_unmitigated": _mean(deployed["ssim_to_plain"]),
            },
        }
    return {
        "settings": settings,
        "criterion": rule.describe(),
        "sizes": {"memorized": len(memorized), "triggers": len(triggers), "clean": len(general)},
        "methods": results,
    }


def _rate_text(r: dict | None) -> str:
    if r is None:
        return ""
    return f"{r['rate']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] ({r['count']}/{r['n']})"


def mitigation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per mitigation: the memorized-and-trigger scenario, then the general one."""
    rows = []
    for key, r in results["methods"].items():
        g = r["general_deployed"]
        rows.append(
            {
                "mitigation": key,
                "memorized: images replicating": _rate_text(r["replication_images"]),
                "memorized: captions memorized": _rate_text(r["memorized_prompts"]),
                "triggers: images replicating": _rate_text(r["replication_triggers"]),
                "flagged (memorized)": f"{r['flagged_share']:.2f}",
                "general: flagged": _rate_text(g["flagged"]),
                "general: fidelity as deployed": f"{g['fidelity']:.3f}",
                "general: fidelity forced on": f"{r['clean_fidelity']:.3f}",
                "general: SSIM to unmitigated, forced on": f"{r['clean_ssim_to_unmitigated']:.3f}",
                "added s / image": f"{r['added_seconds_per_image']:.3f}",
            }
        )
    return rows


def mitigation_markdown(results: dict[str, Any]) -> str:

    s, n = results["settings"], results["sizes"]
    head = (
        f"{n['memorized']} memorized captions, {n.get('triggers', 0)} trigger prompts and {n['clean']} general "
        f"captions, {s['num_gens']} "
        f"generations each, seed {s['seed']}, {s['num_inference_steps']} steps, guidance {s['guidance_scale']}, flag "
        f"threshold {s['threshold']:.3f}; replication: {results['criterion']} (images: SSIM >= 0.7 to a memorized "
        "training image); general prompts as deployed (mitigated where flagged) and forced on; caption fidelity: "
        "colour and shape right (chance 1/48); 95 % Wilson intervals."
    )
    return head + "\n\n" + markdown_table(mitigation_rows(results)) + "\n"


def write_mitigation_report(results: dict[str, Any], out_dir: str | Path) -> Path:

    sections = [
        ("Settings", f"<p>{escape(mitigation_markdown(results).splitlines()[0])}</p>"),
        ("Mitigation", table_html(mitigation_rows(results))),
    ]
    return write_html(Path(out_dir) / "report.html", "diffmem bench mitigation", sections)
