"""The generation stage of a scan: ``num_gens`` images per selected caption (seeds from item ids),
embedded and searched against the training side, one results shard per catalog shard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from diffmem.generation import generate_batches
from diffmem.io import atomic_write
from diffmem.scan.carlini import carlini_clique
from diffmem.scan.config import SSIM_THRESHOLD, ScanConfig
from diffmem.scan.procs import Procs, progress_bar
from diffmem.scan.search import nearest_training
from diffmem.scan.store import ShardStore
from diffmem.scan.training import TrainingSet
from diffmem.seeding import derive_seed


def gens_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("gen", pa.int32()),
            ("seed", pa.int64()),
            ("score", pa.float32()),
            ("nn_row", pa.int64()),
            ("nn_id", pa.string()),
            ("nn_image", pa.string()),
            ("similarity", pa.float32()),
            ("replicated", pa.bool_()),
            ("verbatim", pa.bool_()),
            ("carlini_clique", pa.int32()),
            ("carlini_min_dist", pa.float32()),
            ("ssim", pa.float32()),
            ("ssim_nn_id", pa.string()),
            ("ssim_replicated", pa.bool_()),
            ("image_file", pa.string()),
        ]
    )


def generate_shards(
    cfg: ScanConfig,
    out: Path,
    n_shards: int,
    pipe,
    embedder,
    train: TrainingSet | None,
    selected: set[int] | None,
    procs: Procs,
) -> None:
    """Generate ``num_gens`` images per selected caption, embed them, find the nearest training image."""
    import pyarrow as pa  # the scan extra

    store = ShardStore(out, "gens")
    scores = ShardStore(out, "scores")
    guarded = hasattr(pipe, "memorization_threshold")
    g = cfg.num_gens
    todo = [k for k in procs.mine(n_shards) if not store.done(k)]
    for k in progress_bar(todo, len(todo), "generating and searching", cfg.progress and procs.main):
        rows = scores.read_table(k, ["row", "id", "caption"]).to_pylist()
        if selected is not None:
            rows = [r for r in rows if r["row"] in selected]
        out_rows: list[dict] = []
        images_pil: list = []
        image_cache: dict[int, np.ndarray] = {}
        extra = {"memorization_window": (0, 1)} if guarded else {}
        batches = generate_batches(
            pipe, [r["caption"] for r in rows], item_ids=[r["id"] for r in rows], num_gens=g, seed=cfg.seed,
            batch_size=cfg.batch_size, height=cfg.height, width=cfg.width, num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale, **extra,
        )  # fmt: skip
        for generated in batches:
            batch, result = rows[generated.start : generated.start + len(generated.prompts)], generated.output
            imgs = np.asarray(result.images, dtype=np.float32)
            first_step = getattr(result, "memorization_scores", None) or [float("nan")] * len(imgs)
            pil = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in imgs]
            sims, pos, ssim_best = nearest_training(
                train, embedder.embed(pil), imgs, cfg.ssim_rerank, image_cache
            )
            for i, r in enumerate(batch):
                clique, min_dist = (None, None)
                if cfg.tiled_l2:
                    clique, min_dist = carlini_clique(list(imgs[i * g : (i + 1) * g]), cfg.carlini_delta)
                for j in range(g):
                    n = i * g + j
                    p = int(pos[n])
                    sim = float(sims[n])
                    best_ssim, best_pos = ssim_best[n]
                    out_rows.append(
                        {
                            "row": r["row"],
                            "id": r["id"],
                            "gen": j,
                            "seed": derive_seed(cfg.seed, r["id"], j),
                            "score": float(first_step[n]),
                            "nn_row": train.row(p) if train is not None else -1,
                            "nn_id": train.id(p) if train is not None else None,
                            "nn_image": train.image(p) if train is not None else None,
                            "similarity": sim,
                            "replicated": bool(sim >= embedder.replication_threshold),  # always >=
                            "verbatim": bool(sim >= embedder.verbatim_threshold),
                            "carlini_clique": clique,
                            "carlini_min_dist": min_dist,
                            "ssim": best_ssim,
                            "ssim_nn_id": None if best_pos is None else train.id(best_pos),
                            "ssim_replicated": None if best_ssim is None else best_ssim >= SSIM_THRESHOLD,
                            "image_file": None,
                        }
                    )
                    images_pil.append(pil[n])
        keep_images(cfg, out, k, out_rows, images_pil, embedder.replication_threshold)
        store.write_table(k, pa.Table.from_pylist(out_rows, schema=gens_schema()))


def keep_images(
    cfg: ScanConfig, out: Path, shard: int, rows: list[dict], images: list, threshold: float
) -> None:
    """Save the shard's ``keep_images`` most similar generations and all above ``threshold`` (the global
    worst offenders are among the union of per-shard top lists); written before the shard commits."""
    order = sorted(range(len(rows)), key=lambda i: -np.nan_to_num(rows[i]["similarity"], nan=-2.0))
    keep = set(order[: cfg.keep_images]) | {i for i in order if rows[i]["similarity"] >= threshold}
    for i in sorted(keep):
        rel = f"images/{shard:06d}/{rows[i]['row']}-{rows[i]['gen']}.png"
        atomic_write(out / rel, lambda tmp, im=images[i]: im.save(tmp, format="PNG"))
        rows[i]["image_file"] = rel
