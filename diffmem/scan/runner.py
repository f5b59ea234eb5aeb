"""The scan driver: config -> catalog -> training side -> first-step scores -> generations and search -> summary.

Each stage has its module (``config``, ``catalog``, ``embedding``/``training``, ``scoring``,
``generation``/``search``, ``results``). Work is cut into shards of ``shard_size`` usable rows (one
parquet row group of the catalog each); every stage writes one file per shard, atomically
(``diffmem.scan.store``), and skips shards already written, so an interrupted scan resumes where it
stopped. Under ``accelerate launch`` shard ``k`` goes to process ``k % num_processes``; seeds come
from item ids (``diffmem.seeding``) and batches are formed inside a shard, so the merged results do
not depend on the number of processes.
"""

from __future__ import annotations

import time
from pathlib import Path

from diffmem.attention import use_attention_processor
from diffmem.embed import embedder_from_settings
from diffmem.guard.auto import load_guarded
from diffmem.io import atomic_write, atomic_write_json, remove_stale_temporaries
from diffmem.precision import torch_dtype
from diffmem.scan.bad_rows import bad_table
from diffmem.scan.catalog import Catalog, build_catalog
from diffmem.scan.config import ScanConfig, check_or_write_config
from diffmem.scan.embedding import embed_catalog
from diffmem.scan.generation import generate_shards
from diffmem.scan.layout import LAYOUT_FOLDERS, EmbeddingLayout, write_record
from diffmem.scan.procs import Procs
from diffmem.scan.report import write_scan_report
from diffmem.scan.results import IMAGE_BAD_ROWS, write_summary
from diffmem.scan.scoring import eligible_rows, score_shards, select_for_generation
from diffmem.scan.training import TrainingSet, check_embedder, check_reembedded, compute_background

__all__ = ["ScanConfig", "run_scan"]

#: where a scan keeps the descriptors of its own training images (a clip-retrieval layout)
OWN_EMBEDDINGS = "embeddings"


def _prebuilt_layout(cfg: ScanConfig, embedder):
    """The prebuilt layout, checked against the scan's embedder (before the diffusion model is loaded);
    a declared one (``--train-embedder``) also on a few of its images re-embedded, where they are here."""

    layout = EmbeddingLayout(cfg.train_embeddings, argument="--train-embeddings", declared=cfg.train_embedder)
    check_embedder(layout, embedder.describe(), "--train-embeddings")
    if layout.embedder.get("declared"):
        check_reembedded(layout, embedder)
    return layout


def _training_side(cfg: ScanConfig, out: Path, catalog: Catalog, embedder, layout, procs: Procs):

    if layout is None:
        describe = embedder.describe()
        root = out / OWN_EMBEDDINGS
        if procs.main:
            record = {
                "format": "clip-retrieval",
                "embedder": describe,
                "dtype": "float32",
                "data": str(Path(cfg.data).resolve()),
            }
            write_record(root, record, argument="--out")
        embed_catalog(
            catalog,
            root,
            embedder,
            procs,
            dtype="float32",
            convert_modes=cfg.convert_modes,
            progress=cfg.progress,
        )
        procs.barrier()
        layout = EmbeddingLayout(root, argument="--out")
    return TrainingSet(
        layout,
        index=cfg.index,
        index_file=cfg.train_index,
        rerank=cfg.rerank,
        nprobe=cfg.nprobe,
        index_nprobe=cfg.index_nprobe,
        seed=cfg.seed,
        device=procs.device,
        foreign_index=cfg.train_embedder is not None,  # an index without a diffmem record is accepted
    )


def run_scan(cfg: ScanConfig, pipe=None, embedder=None) -> dict | None:
    """Run (or resume) a scan; returns the summary on the main process, ``None`` on the others."""
    import pyarrow.parquet as pq

    cfg.check()
    out = Path(cfg.out)
    procs = Procs()
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        own = out / OWN_EMBEDDINGS
        stages = [out, out / "scores", out / "gens", own, *(own / d for d in LAYOUT_FOLDERS)]
        remove_stale_temporaries([*stages, *sorted((out / "images").glob("*"))])  # of a killed run
    procs.barrier()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    needs_images = cfg.generate != "none"
    if embedder is None and needs_images:
        embedder = embedder_from_settings(cfg, device=str(procs.device))
    describe = embedder.describe() if embedder is not None else {}
    prebuilt = _prebuilt_layout(cfg, embedder) if needs_images and cfg.prebuilt else None
    if procs.main:
        check_or_write_config(cfg, out, describe)
        if not (out / "catalog.parquet").is_file():
            build_catalog(
                cfg.data,
                out,
                shard_size=cfg.shard_size,
                require_image=needs_images and not cfg.prebuilt,  # a prebuilt side: captions suffice
                check_files=needs_images,
                id_column=cfg.id_column,
                caption_column=cfg.caption_column,
                image_column=cfg.image_column,
                label_column=cfg.label_column,
                # training images embedded from --data: an image without a caption is still searched
                require_caption=not (needs_images and not cfg.prebuilt),
            )
    procs.barrier()
    catalog = Catalog(out)
    timings["catalog_s"] = time.perf_counter() - t0

    if pipe is None:
        pipe = load_guarded(
            cfg.model, device=procs.device, dtype=torch_dtype(cfg.dtype), progress=cfg.progress
        )
        use_attention_processor(pipe.unet, cfg.attention)

    train = None
    skip: set[int] = set()
    if needs_images:
        t = time.perf_counter()
        train = _training_side(cfg, out, catalog, embedder, prebuilt, procs)
        bad_ids = {b["id"] for b in train.bad}
        row_of = {i: r for r, i in zip(catalog.column("row"), catalog.column("id")) if i in bad_ids}
        skip = set(row_of.values())
        if procs.main:  # the training images that failed, where they are this scan's rows
            image_bad = [{**b, "row": row_of[b["id"]]} for b in train.bad if b["id"] in row_of]
            atomic_write(out / IMAGE_BAD_ROWS, lambda tmp: pq.write_table(bad_table(image_bad), tmp))
            compute_background(out / "background.npz", train, cfg.background_sample, cfg.seed)
        timings["embed_index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    score_shards(cfg, out, catalog, pipe, skip, eligible_rows(cfg, catalog, skip), procs)
    procs.barrier()
    timings["score_s"] = time.perf_counter() - t

    if needs_images:
        t = time.perf_counter()
        selected = select_for_generation(cfg, out)
        generate_shards(cfg, out, catalog.n_shards, pipe, embedder, train, selected, procs)
        procs.barrier()
        timings["generate_s"] = time.perf_counter() - t

    if not procs.main:
        return None
    summary = write_summary(cfg, out, describe)
    timings["total_s"] = time.perf_counter() - t0
    atomic_write_json(out / "timings.json", timings)
    if cfg.report:
        write_scan_report(out)
    return summary
