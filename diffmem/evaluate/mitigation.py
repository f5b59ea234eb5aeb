"""The mitigation evaluator: every mitigation on the organism's memorized and clean captions, one ground truth.

For each mitigation (and ``none``, the baseline of the same run):

* **memorized captions** (verbatim and template), ``num_gens`` generations each, mitigated where the
  guard flags them (the model's calibration): the share of images that still replicate a memorized
  training image (SSIM >= 0.7, :data:`~diffmem.scores.replication.PRESETS` ``"organism"``) with its Wilson
  95 % interval, the share of captions memorized (>= 3 of 4 generations), and the seconds the
  mitigation added per image;
* **clean captions** (held-out and generic, "a <colour> <shape>"), mitigation forced on every image
  (``mitigation_threshold=0``), what it costs in quality: caption fidelity (the organism's caption
  classifier, colour and shape right) and the SSIM of each image to the unmitigated one from the same
  noise.

Per-image rows are cached as ``mitigation/<key>.json`` (atomically), so a rerun resumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from diffmem.evaluate.localization import calibrated_nemo
from diffmem.evaluate.metrics import ReplicationRate
from diffmem.evaluate.report import markdown_table
from diffmem.evaluate.suites import MEMORIZED_ROLES, Suite
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


def _plain_clean(pipe, clean, settings, cache: Path) -> torch.Tensor:
    """The unmitigated images of the clean captions ``[n, 3, H, W]`` (cached as ``plain_clean.npy``)."""
    import numpy as np

    path = cache / "plain_clean.npy"
    meta = cache / "plain_clean.json"
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        return torch.from_numpy(np.load(path)).permute(0, 3, 1, 2)
    images, _, _, _ = _generate(
        pipe,
        [p.prompt for p in clean],
        [p.id for p in clean],
        num_gens=settings["num_gens"],
        seed=settings["seed"],
        steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        batch_size=settings["batch_size"],
    )

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.save(f, images)

    atomic_write(path, write)
    atomic_write_json(meta, settings)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def organism_nemo(pipe, reference_prompts: list[str], progress: bool = True):
    """NeMo as deployed on a model of its own: value statistics of ``reference_prompts`` and its threshold
    calibrated on them (mean + 1 std of the criterion's score, NeMo's rule), each flagged prompt localized."""

    nemo = calibrated_nemo(pipe, reference_prompts, progress=progress)
    return NeMoMitigation(stats=nemo.stats, config=nemo.config)


def _rows_for(key, mitigation, pipe, memorized, clean, settings, plain, cache: Path):
    """Per-image rows of one mitigation (cached); ``plain`` holds the unmitigated clean images."""

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
    kwargs = {"memorization_threshold": settings["threshold"]}
    if mitigation is not None:
        kwargs["mitigation"] = mitigation
    images, reports, seconds, flags = _generate(
        pipe, [p.prompt for p in memorized], [p.id for p in memorized], **common, **kwargs
    )

    nearest = organism_training_images(recipe=recipe_of(pipe)).of_roles(MEMORIZED_ROLES).nearest(images)
    forced = (
        {}
        if mitigation is None
        else {
            "mitigation": mitigation,
            "memorization_threshold": settings["threshold"],
            "mitigation_threshold": 0.0,
        }
    )
    clean_images, _, clean_seconds, _ = _generate(
        pipe, [p.prompt for p in clean], [p.id for p in clean], **common, **forced
    )
    x = torch.from_numpy(clean_images).permute(0, 3, 1, 2)
    captions = [p.prompt for p in clean for _ in range(settings["num_gens"])]
    classifier = load_caption_classifier()
    per_image_fidelity = [
        caption_fidelity(classifier, x[i : i + 1], captions[i : i + 1]).both for i in range(len(x))
    ]
    similarity = [1.0] * len(x) if plain is None else ssim(x, plain).tolist()
    data = {
        "settings": settings,
        "memorized": {
            "ids": [p.id for p in memorized],
            "ssim": [m.ssim for m in nearest],
            # the first-step flag (before mitigation) where a mitigation ran, else the call's own flag
            "flagged": [bool(r["flagged"]) if "flagged" in r else bool(f) for r, f in zip(reports, flags)],
            "added_seconds": [
                float(r.get("seconds", 0.0)) if r.get("action", "none") != "none" else 0.0 for r in reports
            ],
            "seconds": seconds,
        },
        "clean": {
            "ids": [p.id for p in clean],
            "fidelity": per_image_fidelity,
            "ssim_to_plain": similarity,
            "seconds": clean_seconds,
        },
    }
    atomic_write_json(path, data)
    return data


def evaluate_mitigations(
    pipe,
    suite: Suite,
    methods: list[tuple[str, dict, Any]],
    out_dir: str | Path,
    *,
    num_gens: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 8,
    threshold: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``{"settings", "methods": {key: {...}}}``; ``methods`` are ``(name, options, Mitigation)``, ``none`` is added first."""

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
    clean = [p for p in split if p.label == 0]
    settings = {
        "num_gens": num_gens,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "threshold": threshold,
        **model_settings(pipe),
    }
    cache = Path(out_dir) / "mitigation"
    rule = criterion("organism")
    plain = _plain_clean(pipe, clean, settings, cache)
    results: dict[str, Any] = {}
    from tqdm.auto import tqdm

    for key, options, mitigation in tqdm(
        [("none", {}, None), *methods], desc="mitigations", disable=not progress
    ):
        name = key if not options else f"{key}-" + "-".join(f"{k}={v}" for k, v in options.items())
        rows = _rows_for(name, mitigation, pipe, memorized, clean, settings, plain, cache)
        sims = torch.tensor(rows["memorized"]["ssim"])
        rate = ReplicationRate()
        rate.update(rule.replicates(sims))
        prompts = ReplicationRate()
        prompts.update(rule.memorized(sims.view(len(memorized), num_gens)))
        flagged = rows["memorized"]["flagged"]
        results[name] = {
            "config": {} if mitigation is None else mitigation.config(),
            "replication_images": rate.compute(),
            "memorized_prompts": prompts.compute(),
            "flagged_share": (sum(flagged) / len(flagged)) if flagged else None,
            "added_seconds_per_image": sum(rows["memorized"]["added_seconds"]) / len(sims),
            "clean_fidelity": sum(rows["clean"]["fidelity"]) / len(rows["clean"]["fidelity"]),
            "clean_ssim_to_unmitigated": sum(rows["clean"]["ssim_to_plain"])
            / len(rows["clean"]["ssim_to_plain"]),
        }
    return {
        "settings": settings,
        "criterion": rule.describe(),
        "sizes": {"memorized": len(memorized), "clean": len(clean)},
        "methods": results,
    }


def mitigation_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for key, r in results["methods"].items():
        img, pr = r["replication_images"], r["memorized_prompts"]
        rows.append(
            {
                "mitigation": key,
                "images replicating": f"{img['rate']:.2f} [{img['ci'][0]:.2f}, {img['ci'][1]:.2f}] ({img['count']}/{img['n']})",
                "captions memorized": f"{pr['rate']:.2f} [{pr['ci'][0]:.2f}, {pr['ci'][1]:.2f}] ({pr['count']}/{pr['n']})",
                "flagged": "" if r["flagged_share"] is None else f"{r['flagged_share']:.2f}",
                "caption fidelity (clean, forced on)": f"{r['clean_fidelity']:.3f}",
                "SSIM to unmitigated (clean)": f"{r['clean_ssim_to_unmitigated']:.3f}",
                "added s / image": f"{r['added_seconds_per_image']:.3f}",
            }
        )
    return rows


def mitigation_markdown(results: dict[str, Any]) -> str:

    s = results["settings"]
    head = (
        f"{results['sizes']['memorized']} memorized and {results['sizes']['clean']} clean captions, {s['num_gens']} "
        f"generations each, seed {s['seed']}, {s['num_inference_steps']} steps, guidance {s['guidance_scale']}, flag "
        f"threshold {s['threshold']:.3f}; replication: {results['criterion']} (images: SSIM >= 0.7 to a memorized "
        "training image); 95 % Wilson intervals."
    )
    return head + "\n\n" + markdown_table(mitigation_rows(results)) + "\n"


def write_mitigation_report(results: dict[str, Any], out_dir: str | Path) -> Path:

    sections = [
        ("Settings", f"<p>{escape(mitigation_markdown(results).splitlines()[0])}</p>"),
        ("Mitigation", table_html(mitigation_rows(results))),
    ]
    return write_html(Path(out_dir) / "report.html", "diffmem bench mitigation", sections)
