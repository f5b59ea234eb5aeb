"""``scan``: the dataset-wide scan on the model organism: does the scan find the verbatim-memorized captions?

The organism's training set (``diffmem organism data``) is scanned as any user dataset would be: one
row per training sample (duplicates included), labels ``memorized = (role == "verbatim")``. Two scans:

* full: first-step score of every distinct caption, ``--num-gens`` generations each, nearest training
  image (pixel descriptor), Carlini's tiled-L2 cliques;
* two-stage (Webster-style): the same first-step scores, generation only for the ``--top-fraction``
  highest-scoring captions (the score shards are reused from the full scan, which is exactly what
  the two-stage scan would compute).

Reported: precision/recall of the per-caption flags at the embedder's thresholds, Somepalli et al.'s
dataset summary and background, max similarity by caption role, and for the two-stage scan the share of
generation it saves and the captions it misses. Writes ``--json`` besides ``--out``'s results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from diffmem.evaluate.base import Evaluation, EvaluationResult, ModelLoader, register_evaluation
from diffmem.io import atomic_write_text
from diffmem.modelio import default_model
from diffmem.organism.data import build_organism_data, export_imagefolder
from diffmem.organism.recipe import OrganismRecipe
from diffmem.scan.results import caption_table, load_results
from diffmem.scan.runner import OWN_EMBEDDINGS, ScanConfig, run_scan

__all__ = ["OrganismScan", "organism_scan_table", "similarity_by_role"]

#: the full scan's stages the two-stage scan starts from (files, then folders)
_SHARED_FILES = ("catalog.parquet", "bad_rows.parquet", "background.npz")
_SHARED_STAGES = (OWN_EMBEDDINGS, "scores")
#: the full scan's numbers the table shows
_SUMMARY_KEYS = (
    "captions_scored",
    "generations",
    "sim_mean",
    "sim_75pc",
    "sim_90pc",
    "sim_95pc",
    "bg_mean",
    "bg_95pc",
)


def organism_scan_table(work: Path, seed: int = 0) -> Path:
    """Export the organism's training set and a (id, caption, image, memorized, role) parquet table."""
    folder = work / "data"
    if not (folder / "metadata.jsonl").is_file():
        export_imagefolder(build_organism_data(OrganismRecipe(seed=seed)), folder)
    table = work / "organism_scan_table.parquet"
    if not table.is_file():
        rows = []
        with open(folder / "metadata.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                rows.append(
                    {
                        "id": r["id"],
                        "caption": r["text"],
                        "image": str((folder / r["file_name"]).resolve()),
                        "memorized": int(r["role"] == "verbatim"),
                        "role": r["role"],
                    }
                )
        pq.write_table(pa.Table.from_pylist(rows), table)
    return table


def similarity_by_role(out: Path, table: Path) -> dict:
    """Per caption role: how many captions, their max similarity (mean, min, max) and mean first-step score."""
    roles = dict(
        zip(*(pq.read_table(table, columns=["id", "role"]).column(c).to_pylist() for c in ("id", "role")))
    )
    res = load_results(out)
    per = caption_table(res["gens"])
    scores = dict(zip(res["scores"].column("id").to_pylist(), res["scores"].column("score").to_pylist()))
    stats = {}
    for role in sorted({roles[i] for i in per}):
        sims = [per[i]["max_similarity"] for i in per if roles[i] == role]
        sc = [scores[i] for i in per if roles[i] == role]
        stats[role] = {
            "captions": len(sims),
            "max_similarity_mean": float(np.mean(sims)),
            "max_similarity_min": float(np.min(sims)),
            "max_similarity_max": float(np.max(sims)),
            "first_step_score_mean": float(np.mean(sc)),
        }
    return stats


def _seed_two_stage(full_out: Path, top_out: Path) -> None:
    """Copy the full scan's catalog, training side and score shards: what the two-stage scan computes first."""
    top_out.mkdir(exist_ok=True)
    for name in _SHARED_FILES:
        if not (top_out / name).exists():
            shutil.copy2(full_out / name, top_out / name)
    for stage in _SHARED_STAGES:
        if not (top_out / stage).exists():
            shutil.copytree(full_out / stage, top_out / stage)


def _timed_scan(config: ScanConfig, pipe) -> tuple[dict, float]:
    start = time.perf_counter()
    summary = run_scan(config, pipe=pipe)
    return summary, time.perf_counter() - start


def _table(result: dict) -> str:
    full = result["full_scan"]
    return "\n".join(
        [
            json.dumps({k: full.get(k) for k in _SUMMARY_KEYS}, indent=1),
            "flags: "
            + json.dumps({k: full.get(k) for k in ("flags_replication", "flags_verbatim")}, indent=1),
            "by role: " + json.dumps(result["by_role"], indent=1),
            "two-stage: " + json.dumps(result["two_stage"], indent=1),
        ]
    )


@register_evaluation
class OrganismScan(Evaluation):
    name = "scan"
    help = "scan the organism's training set (full and two-stage): are the verbatim-memorized captions found?"
    default_out = "runs/scan_eval"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--work", dest="out", default=argparse.SUPPRESS, help="the same as --out (the script's name)"
        )
        parser.add_argument("--num-gens", type=int, default=4, help="generations per caption (default 4)")
        parser.add_argument(
            "--steps", type=int, default=None, help="default: the organism recipe's sampling steps"
        )
        parser.add_argument(
            "--top-fraction", type=float, default=0.25, help="captions the two-stage scan generates"
        )
        parser.add_argument("--json", default="benchmarks/results/scan_eval.json", help="the raw numbers")

    def check(self) -> None:
        self.model = self.args.model or default_model()
        if self.model is None:
            raise ValueError(
                "--model: the model organism is not there yet (weights/diffmem-organism-v2); pass --model"
            )

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        args = self.args
        recipe = OrganismRecipe()
        work = Path(args.out)
        work.mkdir(parents=True, exist_ok=True)
        table = organism_scan_table(work)
        pipe = load_model()
        common = dict(
            data=str(table),
            model=str(self.model),
            num_gens=args.num_gens,
            steps=args.steps or recipe.num_inference_steps,
            guidance_scale=recipe.guidance_scale,
            shard_size=128,  # one caption per 32 rows here (generic captions): keep batches full
            batch_size=8,
            pixel_size=32,
            tiled_l2=True,
            keep_images=4,
            ssim_rerank=8,
            background_sample=0,
        )
        full, full_s = _timed_scan(ScanConfig(out=str(work / "scan_all"), generate="all", **common), pipe)
        top_out = work / "scan_top"
        _seed_two_stage(work / "scan_all", top_out)
        top, top_s = _timed_scan(
            ScanConfig(out=str(top_out), generate="top", top_fraction=args.top_fraction, **common), pipe
        )
        full_flags = {
            i
            for i, v in caption_table(load_results(work / "scan_all")["gens"]).items()
            if v["max_similarity"] > full["embedder"]["verbatim_threshold"]
        }
        top_gen = set(caption_table(load_results(top_out)["gens"]))
        timings = json.loads((work / "scan_all" / "timings.json").read_text())
        result = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
            "model": str(self.model),
            "settings": {k: v for k, v in common.items() if k not in ("data", "model")},
            "full_scan": full,
            "by_role": similarity_by_role(work / "scan_all", table),
            "two_stage": {
                **top["two_stage"],
                "verbatim_flagged_by_full_scan": len(full_flags),
                "verbatim_flagged_missed_by_two_stage": sorted(full_flags - top_gen),
                "generate_seconds_full": timings.get("generate_s"),
                "generate_seconds_two_stage": json.loads((top_out / "timings.json").read_text()).get(
                    "generate_s"
                ),
            },
            "wall_seconds": {"full": full_s, "two_stage_after_full": top_s},
        }
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        return EvaluationResult(result, _table(result), [str(args.json)])
