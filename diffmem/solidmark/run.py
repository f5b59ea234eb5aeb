"""A SolidMark scoring run from files: read and check the keyed dataset, set up the model, score, report."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.data import check_record, open_dataset
from diffmem.fingerprint import model_fingerprint
from diffmem.records import BadRow
from diffmem.scores.solidmark import DEFAULT_DELTAS
from diffmem.solidmark.manifest import KeyManifest, check_ids, check_keyed_dataset
from diffmem.solidmark.scoring import (
    ScoreItem,
    ScoreSettings,
    describe_edit,
    pipeline_outpainter,
    randomize_unet,
    read_rows,
    score_items,
)
from diffmem.solidmark.summary import finalize


def load_score_items(
    data: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    where: Mapping[str, str] | None = None,
    one_per_group: bool = False,
    sample: int | None = None,
    seed: int = 0,
) -> tuple[KeyManifest, list[ScoreItem]]:
    """Read the keyed dataset and its manifest, check that they belong together, select the images to score.

    Raises ``ValueError`` naming the file and image for ids that differ between the dataset and the
    manifest, unreadable rows, images whose frame does not hold the manifest's key (wrong frame width
    or value space) and sizes Stable Diffusion cannot generate (not multiples of 8).
    """

    manifest = KeyManifest.load(manifest_path)
    records, bad = [], []
    for item in open_dataset(data):
        (bad if isinstance(item, BadRow) else records).append(item)
    if bad:
        b = bad[0]
        raise ValueError(
            f"--data {data}: {len(bad)} unreadable row(s), first: row {b.row} ({b.id}): {b.reason}: {b.detail}"
        )
    check_ids(manifest, [r.id for r in records], source=f"--data {data}")
    for column, value in (where or {}).items():
        if records and column not in records[0].extra:
            raise ValueError(f"--where {column}={value}: the dataset has no column {column!r}")
        records = [r for r in records if str(r.extra.get(column)) == value]
    table = manifest.by_id()
    if one_per_group:
        seen: set[str] = set()
        kept = []
        for r in records:
            g = table[r.id].group or r.id
            if g not in seen:
                seen.add(g)
                kept.append(r)
        records = kept
    if sample is not None and sample < len(records):
        rng = np.random.default_rng(seed)
        pick = sorted(rng.choice(len(records), size=sample, replace=False).tolist())
        records = [records[i] for i in pick]
    if not records:
        raise ValueError(f"--data {data}: no image left to score after the selection")
    items = []
    for r in records:
        image, bad_row = check_record(r)
        if bad_row is not None:
            raise ValueError(f"--data {data}: image {r.id!r}: {bad_row.reason}: {bad_row.detail}")
        pixels = np.asarray(image, dtype=np.uint8)
        h, w = pixels.shape[:2]
        if h % 8 or w % 8:
            raise ValueError(
                f"--data {data}: image {r.id!r} is {w}x{h} px; Stable Diffusion needs multiples of 8 "
                "(key the dataset with --size)"
            )
        items.append(ScoreItem(r.id, r.caption, pixels, dict(r.extra)))
    try:
        check_keyed_dataset(manifest, [(it.id, it.image) for it in items])
    except ValueError as err:
        raise ValueError(f"--data {data} with --manifest {manifest_path}: {err}") from err
    return manifest, items


def run_score(
    pipe,
    manifest: KeyManifest,
    items: Sequence[ScoreItem],
    out_dir: str | os.PathLike,
    *,
    steps: int = 100,
    guidance_scale: float = 3.0,
    generations: int = 1,
    seed: int = 0,
    batch_size: int = 4,
    deltas: Sequence[float] = DEFAULT_DELTAS,
    group_column: str | None = None,
    random_init: bool = False,
    edits: Sequence[Any] = (),
    prompt_mitigation=None,
    baseline_run: str | os.PathLike | None = None,
    save_maps: bool = False,
    save_images: bool = False,
    run_info: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``items`` with ``pipe`` (a ``SolidMarkOutpaintPipeline``) into ``out_dir``; return the summary.

    ``random_init`` swaps in a freshly initialized UNet (the untrained baseline); ``edits`` (NeuronSet,
    WeightMask, or any ``unet -> context manager``) are applied during every generation, and
    ``prompt_mitigation`` (e.g. :func:`~diffmem.solidmark.mitigations.gaussian_embedding_noise`) replaces
    the prompts by the embeddings it returns.
    """

    if random_init:
        randomize_unet(pipe, seed)
    pipe.set_progress_bar_config(disable=True)
    info = dict(run_info or {})
    info.update(
        {
            "unet_fingerprint": model_fingerprint(pipe.unet),
            "random_init": random_init,
            "edits": [describe_edit(e) for e in edits],
            "prompt_mitigation": getattr(prompt_mitigation, "__name__", None) if prompt_mitigation else None,
            "scheduler": type(pipe.scheduler).__name__,
            "prediction_type": pipe.scheduler.config.get("prediction_type", "epsilon"),
        }
    )
    settings = ScoreSettings(steps, guidance_scale, seed, generations, save_maps, save_images)
    outpaint = pipeline_outpainter(pipe, steps, guidance_scale, edits, prompt_mitigation)
    rows = score_items(outpaint, manifest, items, out_dir, settings, batch_size, info, progress)
    wanted = {(it.id, g) for it in items for g in range(generations)}
    rows = [r for r in rows if (r["id"], int(r["generation"])) in wanted]
    baseline_rows = None
    if baseline_run is not None:
        baseline_rows = read_rows(baseline_run)
        if not baseline_rows:
            raise ValueError(f"--baseline-run: {baseline_run} holds no SolidMark results")
    info["settings"] = settings.to_dict()
    return finalize(Path(out_dir), rows, deltas, group_column, info, baseline_rows, seed)
