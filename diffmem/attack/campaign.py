"""The Finding Dori attack on every target of a dataset, resumable, with ``results.jsonl``,
``triggers.safetensors``, ``report.json`` and ``report.html`` in one folder (``diffmem attack``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from diffmem.attack.dori import DoriConfig, attack_target
from diffmem.attack.targets import load_image_tensor
from diffmem.edits import Edit, applied
from diffmem.fingerprint import model_fingerprint
from diffmem.io import atomic_save_tensors, atomic_write_json, atomic_write_text
from diffmem.records import Record
from diffmem.report import img_tag, table_html, write_html
from diffmem.scores.replication import ReplicationCriterion
from diffmem.scores.solidmark import binomial_ci

#: Columns of the report's per-target table.
TARGET_COLUMNS = [
    "id",
    "caption",
    "initial_loss",
    "final_loss",
    "similarity_before_mean",
    "similarity_after_mean",
    "replicated_before",
    "replicated_after",
]


def _hwc(image):
    return image.permute(1, 2, 0).float().numpy()


def _done_rows(results_path: Path, settings: dict) -> dict[str, dict]:
    """Rows of ``results.jsonl`` by id; a row made with other settings is an error naming ``--out``."""
    done: dict[str, dict] = {}
    if results_path.is_file():
        for line in results_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("settings", settings) != settings:  # rows written before settings were: accepted
                    raise ValueError(
                        f"--out: {results_path} holds targets attacked with other settings "
                        f"({row.get('settings')}); rerun with the same ones to resume, or use another --out"
                    )
                done[row["id"]] = row
    return done


def _images_html(image, outcome) -> str:
    return (
        img_tag(_hwc(image), "training image")
        + " caption: "
        + "".join(img_tag(_hwc(im), "from the caption") for im in outcome.images_before)
        + " trigger: "
        + "".join(img_tag(_hwc(im), "from the trigger") for im in outcome.images_after)
    )


def _summary(rows: list[dict], threshold: float) -> dict:
    n = len(rows)
    replicated_before = sum(r["replicated_before"] for r in rows)
    replicated_after = sum(r["replicated_after"] for r in rows)
    return {
        "targets": n,
        "similarity_before_mean": sum(r["similarity_before_mean"] for r in rows) / n,
        "similarity_after_mean": sum(r["similarity_after_mean"] for r in rows) / n,
        "replication_rate_before": replicated_before / n,
        "replication_rate_before_ci": binomial_ci(replicated_before, n),
        "replication_rate_after": replicated_after / n,
        "replication_rate_after_ci": binomial_ci(replicated_after, n),
        "threshold": threshold,
        "criterion": ReplicationCriterion(threshold, "mean").describe(),
        "similarity": "SSIM (torchmetrics) to the training image, mean over seeds",
    }


def _write_report(out: Path, summary: dict, rows: list[dict], images_html: dict[str, str]) -> None:
    sections = [
        ("Summary", table_html([{k: v for k, v in summary.items() if k not in ("config", "edit")}])),
        ("Targets", table_html(rows, TARGET_COLUMNS)),
    ]
    if images_html:
        body = "".join(f"<p>{table_html([{'id': k}])}{v}</p>" for k, v in images_html.items())
        sections.append(("Images of this run (training image, from the caption, from the trigger)", body))
    write_html(out / "report.html", "diffmem attack", sections)


def attack_targets(
    pipe,
    targets: Sequence[Record],
    out: str | Path,
    config: DoriConfig,
    *,
    edit: Edit | None = None,
    edit_files: dict | None = None,
    model: str | None = None,
    dtype: str = "float32",
    seeds: int = 4,
    gen_steps: int = 50,
    guidance_scale: float = 7.5,
    threshold: float = 0.5,
    height: int,
    width: int,
) -> dict:
    """Attack every target with ``edit`` applied (resuming from ``out/results.jsonl``), write the
    triggers, results and reports to ``out`` and return the summary (``report.json``).

    ``edit_files`` names the edit in the records (``{"mask": ..., "neurons": ...}``); ``model`` the model.
    Generations use seeds ``config.seed * 1000 + s`` for ``s < seeds``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path, triggers_path = out / "results.jsonl", out / "triggers.safetensors"
    settings = {
        "model_fingerprint": model_fingerprint(pipe.unet),
        "dtype": dtype,
        "resolution": [height, width],
        "edit": None if edit is None else edit_files,
        "config": {k: v for k, v in config.__dict__.items() if k != "gradient_checkpointing"},
        "seeds": seeds,
        "gen_steps": gen_steps,
        "guidance_scale": guidance_scale,
        "threshold": threshold,
    }
    done = _done_rows(results_path, settings)
    triggers = load_file(str(triggers_path)) if triggers_path.is_file() else {}
    images_html: dict[str, str] = {}
    with applied(pipe.unet, edit):
        for record in tqdm(targets, desc="Dori attack", unit="target"):
            rid = str(record.id)
            if rid in done:
                continue
            image = load_image_tensor(record.image)
            outcome = attack_target(
                pipe,
                rid,
                record.caption,
                image,
                config,
                seeds=[config.seed * 1000 + s for s in range(seeds)],
                threshold=threshold,
                num_inference_steps=gen_steps,
                guidance_scale=guidance_scale,
                keep_images=True,
                height=height,
                width=width,
            )
            done[rid] = {**outcome.row(), "settings": settings}
            triggers[rid] = outcome.embeds[0].contiguous()
            images_html[rid] = _images_html(image, outcome)
            atomic_save_tensors(triggers_path, triggers, {"format": "diffmem.dori_triggers/1"})
            atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in done.values()))
    rows = [done[str(r.id)] for r in targets]
    summary = {
        "model": model,
        "edit": None if edit is None else edit_files,
        **_summary(rows, threshold),
        "config": config.__dict__,
        "resolution": [height, width],
        "dtype": dtype,
    }
    atomic_write_json(out / "report.json", summary)
    _write_report(out, summary, rows, images_html)
    return summary
