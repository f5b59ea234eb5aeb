"""First-step memorization scores (Wen et al.) of the scan's captions, and the choice of which
captions to generate for (all, or the top fraction by score: Webster's two-stage scan)."""

from __future__ import annotations

from pathlib import Path

from diffmem.detect import score_prompts
from diffmem.scan.catalog import Catalog
from diffmem.scan.config import ScanConfig
from diffmem.scan.procs import Procs, progress_bar
from diffmem.scan.store import ShardStore
from diffmem.scan.summary import top_fraction


def eligible_rows(cfg: ScanConfig, catalog: Catalog, skip_rows: set[int]) -> set[int] | None:
    """Rows to score: with ``unique_captions``, the first usable row of each distinct caption (a caption
    shared by many training images is generated once); ``None`` = every usable row with a caption (a
    training image without one is searched, never prompted)."""
    if not cfg.unique_captions:
        return None
    seen: set[str] = set()
    keep: set[int] = set()
    for row, caption in zip(catalog.column("row"), catalog.column("caption")):
        if row in skip_rows or caption is None or caption in seen:
            continue
        seen.add(caption)
        keep.add(row)
    return keep


def scores_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("caption", pa.string()),
            ("label", pa.int64()),
            ("score", pa.float32()),
            ("gen_scores", pa.list_(pa.float32())),
        ]
    )


def score_shards(
    cfg: ScanConfig,
    out: Path,
    catalog: Catalog,
    pipe,
    skip_rows: set[int],
    eligible: set[int] | None,
    procs: Procs,
) -> None:
    """First-step memorization scores (Wen et al.) of every usable caption, one shard file each."""
    import pyarrow as pa

    store = ShardStore(out, "scores")
    todo = [k for k in procs.mine(catalog.n_shards) if not store.done(k)]
    for k in progress_bar(todo, len(todo), "first-step scores", cfg.progress and procs.main):
        rows = [
            r
            for r in catalog.shard(k, ["row", "id", "caption", "label"])
            if r["row"] not in skip_rows
            and r["caption"] is not None
            and (eligible is None or r["row"] in eligible)
        ]
        table_rows = []
        if rows:
            scores = score_prompts(
                pipe,
                [r["caption"] for r in rows],
                num_gens=cfg.num_gens,
                window=(0, 1),
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                seed=cfg.seed,
                item_ids=[r["id"] for r in rows],
                batch_size=cfg.batch_size,
                progress=False,
                attention=cfg.attention,
                height=cfg.height,
                width=cfg.width,
            ).numpy()
            for r, s in zip(rows, scores):
                table_rows.append({**r, "score": float(s.mean()), "gen_scores": [float(x) for x in s]})
        store.write_table(k, pa.Table.from_pylist(table_rows, schema=scores_schema()))


def select_for_generation(cfg: ScanConfig, out: Path) -> set[int] | None:
    """Catalog rows to generate for: all scored rows, or (two-stage) the top fraction by score."""
    if cfg.generate == "all":
        return None

    table = ShardStore(out, "scores").concat(["row", "id", "score"])
    if table is None or table.num_rows == 0:
        return set()
    ids = table.column("id").to_pylist()
    chosen = top_fraction(table.column("score").to_pylist(), ids, cfg.top_fraction)
    return {r for r, i in zip(table.column("row").to_pylist(), ids) if i in chosen}
