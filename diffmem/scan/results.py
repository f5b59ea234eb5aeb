"""Merged scan results and the dataset-level summary (``summary.json``), drawn from the shard files alone."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.io import atomic_write_json
from diffmem.scan.config import SSIM_THRESHOLD
from diffmem.scan.store import ShardStore
from diffmem.scan.summary import flag_metrics, similarity_stats

#: the training-image bad rows that apply to a scan's rows (written by the runner)
IMAGE_BAD_ROWS = "image_bad_rows.parquet"


def load_results(out: str | Path) -> dict[str, Any]:
    """``{"scores": table, "gens": table, "bad_rows": table, "background": dict}`` of a scan folder,
    shards merged in shard order (pyarrow tables; ``None`` for a stage that did not run)."""
    import pyarrow.parquet as pq

    out = Path(out)
    bg = None
    if (out / "background.npz").is_file():
        with np.load(out / "background.npz") as f:
            bg = {k: f[k] for k in f.files}
    bad = pq.read_table(out / "bad_rows.parquet") if (out / "bad_rows.parquet").is_file() else None
    image_bad = out / IMAGE_BAD_ROWS
    if image_bad.is_file():
        import pyarrow as pa

        extra = pq.read_table(image_bad)
        bad = pa.concat_tables([bad, extra]) if bad is not None else extra
    return {
        "scores": ShardStore(out, "scores").concat(),
        "gens": ShardStore(out, "gens").concat(),
        "bad_rows": bad,
        "background": bg,
    }


def _roc_auc(scores, labels) -> float | None:
    y = np.asarray(labels)
    if len(set(y.tolist())) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def caption_table(gens) -> dict[str, dict[str, Any]]:
    """Per caption id: max similarity over its generations, its nearest id there, and Carlini's clique."""
    per: dict[str, dict[str, Any]] = {}
    if gens is None:
        return per
    for r in gens.select(["id", "row", "similarity", "nn_id", "carlini_clique"]).to_pylist():
        cur = per.get(r["id"])
        sim = r["similarity"] if r["similarity"] is not None and np.isfinite(r["similarity"]) else -np.inf
        if cur is None or sim > cur["max_similarity"]:
            per[r["id"]] = {
                "row": r["row"],
                "max_similarity": sim,
                "nn_id": r["nn_id"],
                "carlini_clique": r["carlini_clique"],
            }
    return per


def write_summary(cfg, out: Path, describe: dict) -> dict[str, Any]:
    """Somepalli et al.'s dataset statistics, bad-row counts, flags and (with labels) precision/recall."""
    import pyarrow.parquet as pq

    res = load_results(out)
    scores, gens, bg = res["scores"], res["gens"], res["background"]
    read_bad = pq.read_table(out / "bad_rows.parquet").to_pylist()
    image_bad = pq.read_table(out / IMAGE_BAD_ROWS).to_pylist() if (out / IMAGE_BAD_ROWS).is_file() else []
    bad_all = read_bad + image_bad
    rep_t = describe.get("replication_threshold", 0.5)
    ver_t = describe.get("verbatim_threshold", 0.7)
    thresholds = {"05pc" if rep_t == 0.5 else f"{rep_t:g}": rep_t, "verbatim": ver_t}
    summary: dict[str, Any] = {
        "data": str(Path(cfg.data).resolve()),
        "model": cfg.model or "default (model organism)",
        "embedder": describe,
        "generate": cfg.generate,
        "num_gens": cfg.num_gens,
        "steps": cfg.steps,
        "guidance_scale": cfg.guidance_scale,
        "seed": cfg.seed,
        "index": cfg.index,
        "train_embeddings": cfg.train_embeddings,
        "train_index": cfg.train_index,
    }
    catalog_rows = pq.ParquetFile(out / "catalog.parquet").metadata.num_rows
    summary["rows_read"] = catalog_rows + len(read_bad)
    summary["bad_rows"] = len(bad_all)
    summary["bad_rows_by_reason"] = dict(sorted(Counter(b["reason"] for b in bad_all).items()))
    n_scored = scores.num_rows if scores is not None else 0
    summary["captions_scored"] = n_scored
    summary["unique_captions"] = cfg.unique_captions
    # training images without a caption: embedded and searched, never prompted (their bad images aside)
    captions = pq.read_table(out / "catalog.parquet", columns=["row", "caption"]).to_pylist()
    bad_image_rows = {b["row"] for b in image_bad}
    no_caption = sum(c["caption"] is None and c["row"] not in bad_image_rows for c in captions)
    summary["training_images_without_caption"] = no_caption
    # rows repeating a caption
    summary["usable_rows_not_scored"] = catalog_rows - len(image_bad) - n_scored - no_caption
    score_vals = scores.column("score").to_numpy() if n_scored else np.zeros(0)
    summary.update(similarity_stats(score_vals, "score"))

    labels = None
    if n_scored:
        lab = scores.column("label").to_pylist()
        if any(v is not None for v in lab):
            labels = {i: v for i, v in zip(scores.column("id").to_pylist(), lab) if v is not None}
            ids_l = list(labels)
            by_id = dict(zip(scores.column("id").to_pylist(), score_vals.tolist()))
            summary["labelled_captions"] = len(ids_l)
            summary["labelled_memorized"] = int(sum(labels.values()))
            summary["score_auc"] = _roc_auc([by_id[i] for i in ids_l], [labels[i] for i in ids_l])

    if gens is not None and gens.num_rows:
        sims = gens.column("similarity").to_numpy(zero_copy_only=False)
        summary["captions_generated"] = len(set(gens.column("id").to_pylist()))
        summary["generations"] = gens.num_rows
        summary.update(similarity_stats(sims, "sim", thresholds))
        per = caption_table(gens)
        summary["captions_replicated"] = sum(v["max_similarity"] > rep_t for v in per.values())
        summary["captions_verbatim"] = sum(v["max_similarity"] > ver_t for v in per.values())
        if cfg.tiled_l2:
            summary["carlini_min_clique"] = cfg.min_clique
            summary["carlini_delta"] = cfg.carlini_delta
            summary["captions_carlini"] = sum(
                (v["carlini_clique"] or 0) >= cfg.min_clique for v in per.values()
            )
        ssim_vals = gens.column("ssim").to_pylist()
        if any(v is not None for v in ssim_vals):
            summary.update(
                similarity_stats([v for v in ssim_vals if v is not None], "ssim", {"thr": SSIM_THRESHOLD})
            )
            best_ssim: dict[str, float] = {}
            for i, v in zip(gens.column("id").to_pylist(), ssim_vals):
                if v is not None:
                    best_ssim[i] = max(best_ssim.get(i, -1.0), v)
            summary["ssim_threshold"] = SSIM_THRESHOLD
            summary["captions_ssim_replicated"] = sum(v >= SSIM_THRESHOLD for v in best_ssim.values())
            if labels is not None:
                ids_s = [i for i in labels if i in best_ssim]
                summary["flags_ssim"] = {
                    "threshold": SSIM_THRESHOLD,
                    **flag_metrics(
                        [best_ssim[i] >= SSIM_THRESHOLD for i in ids_s], [labels[i] for i in ids_s]
                    ),
                }
        if labels is not None:
            lab_ids = [i for i in labels if i in per]
            for name, t in (("replication", rep_t), ("verbatim", ver_t)):
                summary[f"flags_{name}"] = {
                    "threshold": t,
                    **flag_metrics(
                        [per[i]["max_similarity"] > t for i in lab_ids], [labels[i] for i in lab_ids]
                    ),
                }
            summary["max_similarity_auc"] = _roc_auc(
                [per[i]["max_similarity"] for i in lab_ids], [labels[i] for i in lab_ids]
            )
        if cfg.generate == "top":
            gen_ids = set(per)
            summary["two_stage"] = {
                "top_fraction": cfg.top_fraction,
                "captions_generated": len(gen_ids),
                "captions_eligible": n_scored,
                "generation_saved_fraction": 1 - len(gen_ids) / n_scored if n_scored else None,
            }
            if labels is not None:
                missed = sorted(i for i, v in labels.items() if v == 1 and i not in gen_ids)
                summary["two_stage"]["memorized_not_generated"] = len(missed)
                summary["two_stage"]["memorized_not_generated_ids"] = missed[:50]
    if bg is not None:
        summary.update(similarity_stats(bg["sims"], "bg", thresholds))
    atomic_write_json(out / "summary.json", summary)
    return summary


def read_summary(out: str | Path) -> dict[str, Any]:
    return json.loads((Path(out) / "summary.json").read_text())
