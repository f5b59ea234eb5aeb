"""The scan engine: catalog -> training descriptors -> first-step scores -> generations -> search -> summary.

Work is cut into shards of ``shard_size`` usable rows (one parquet row group of the catalog each);
every stage writes one file per shard, atomically (``diffmem.scan.store``), and skips shards already
written, so an interrupted scan resumes where it stopped. Under ``accelerate launch`` shard ``k`` goes
to process ``k % num_processes``; seeds come from item ids (``diffmem.seeding``) and batches are formed
inside a shard, so the merged results do not depend on the number of processes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffmem.io import atomic_write, atomic_write_json
from diffmem.precision import DTYPES
from diffmem.scan.store import ShardStore

GENERATE_MODES = ("all", "top", "none")
LABEL_COLUMNS = ("memorized", "is_memorized", "label")
#: settings that may change between a run and its resume (the attention kernel changes float rounding only)
MARGIN_KEYS = ("progress", "report", "out", "attention")
#: settings added after scans were first written: a scan.json without them was made with these values
ADDED_KEYS = {"dtype": "float32"}


@dataclass
class ScanConfig:
    """Settings of one scan; everything but ``MARGIN_KEYS`` must match when a scan is resumed."""

    data: str
    out: str
    model: str | None = None
    generate: str = "all"  # all | top (two-stage: only the top fraction by first-step score) | none
    top_fraction: float = 0.1
    num_gens: int = 4
    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    shard_size: int = 64
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    dtype: str = (
        "float32"  # the model's precision (diffmem.precision.DTYPES); scores and similarities stay float32
    )
    attention: str | None = "auto"  # diffmem.attention: xformers on CUDA where it imports, else SDPA
    embedder: str = "pixel"
    embedder_file: str | None = None
    embedder_arch: str | None = None
    sscd_preprocessing: str = "small_288"
    pixel_size: int = 32
    allow_torchscript: bool = False
    allow_pickle: bool = False
    index: str = "flat"
    nprobe: int = 16
    background_sample: int = 10_000
    tiled_l2: bool = False
    carlini_delta: float = 0.15
    carlini_min_clique: int | None = None
    keep_images: int = 8
    ssim_rerank: int = 0  # > 0: SSIM of each generation to its K nearest training images (by descriptor)
    id_column: str | None = None
    caption_column: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    convert_modes: bool = False
    unique_captions: bool = True  # score and generate once per distinct caption (its first usable row)
    report: bool = True
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if self.generate not in GENERATE_MODES:
            raise ValueError(
                f"--generate: expected one of {', '.join(GENERATE_MODES)}, got {self.generate!r}"
            )
        for name in ("num_gens", "steps", "shard_size", "batch_size", "pixel_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction: expected 0 < fraction <= 1, got {self.top_fraction}")
        if self.keep_images < 0 or self.background_sample < 0 or self.ssim_rerank < 0:
            raise ValueError("--keep-images, --background-sample and --ssim-rerank must be >= 0")

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in MARGIN_KEYS:
            d.pop(k)
        d["data"] = str(Path(self.data).resolve())
        return d

    @property
    def min_clique(self) -> int:
        return self.carlini_min_clique or max(2, min(10, self.num_gens))


# ------------------------------------------------------------------------------------------ processes


class _Procs:
    """Rank, world size and barrier from accelerate (single process when not launched)."""

    def __init__(self):
        import torch
        from accelerate import PartialState

        self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index
        self.world = self.state.num_processes
        self.device = self.state.device
        self.main = self.state.is_main_process

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def mine(self, n_shards: int) -> list[int]:
        return [k for k in range(n_shards) if k % self.world == self.rank]


def _bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="shard", disable=not enabled)


# ------------------------------------------------------------------------------------------- catalog


def _as_label(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return int(value)
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "memorized"):
        return 1
    if s in ("0", "false", "no", ""):
        return 0
    try:
        return int(float(s) > 0)
    except ValueError:
        return None


def _catalog_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("caption", pa.string()),
            ("image", pa.string()),
            ("label", pa.int64()),
            ("extra", pa.string()),
        ]
    )


BAD_SCHEMA_FIELDS = (
    ("row", "int64"),
    ("id", "string"),
    ("reason", "string"),
    ("detail", "string"),
    ("stage", "string"),
)


def _bad_table(rows: list[dict]):
    import pyarrow as pa

    schema = pa.schema([(n, getattr(pa, t)()) for n, t in BAD_SCHEMA_FIELDS])
    return pa.Table.from_pylist(rows, schema=schema)


def build_catalog(cfg: ScanConfig, out: Path) -> None:
    """Stream the dataset once into ``catalog.parquet`` (usable rows, row group = shard) and
    ``bad_rows.parquet``; the catalog is committed last (it marks the stage done)."""
    import pyarrow.parquet as pq

    from diffmem.data import BadRow, open_dataset

    items = open_dataset(
        cfg.data,
        id_column=cfg.id_column,
        caption_column=cfg.caption_column,
        image_column=cfg.image_column,
        require_image=cfg.generate != "none",
        check_files=cfg.generate != "none",
    )
    schema = _catalog_schema()
    bad: list[dict] = []
    label_col = cfg.label_column

    def write(tmp: str) -> None:
        nonlocal label_col
        chunk: list[dict] = []
        with pq.ParquetWriter(tmp, schema) as writer:
            for item in items:
                if isinstance(item, BadRow):
                    bad.append({**item.as_dict(), "stage": "read"})
                    bad[-1].pop("source", None)
                    continue
                if label_col is None:
                    label_col = next((c for c in LABEL_COLUMNS if c in item.extra), "")
                extra = {k: v for k, v in item.extra.items() if k != label_col}
                chunk.append(
                    {
                        "row": item.row,
                        "id": item.id,
                        "caption": item.caption,
                        "image": None if item.image is None else str(item.image),
                        "label": _as_label(item.extra.get(label_col)) if label_col else None,
                        "extra": json.dumps(extra, default=str, ensure_ascii=False) if extra else None,
                    }
                )
                if len(chunk) == cfg.shard_size:
                    writer.write_table(_table(chunk, schema), row_group_size=cfg.shard_size)
                    chunk = []
            if chunk:
                writer.write_table(_table(chunk, schema), row_group_size=cfg.shard_size)

    tmp_catalog = out / ".catalog.parquet.building"
    write(str(tmp_catalog))
    atomic_write(out / "bad_rows.parquet", lambda tmp: pq.write_table(_bad_table(bad), tmp))
    with open(tmp_catalog, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp_catalog, out / "catalog.parquet")


def _table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


class Catalog:
    """Read access to ``catalog.parquet``: shards (row groups) and whole small columns."""

    def __init__(self, out: Path):
        import pyarrow.parquet as pq

        self.path = out / "catalog.parquet"
        self.file = pq.ParquetFile(self.path)
        self.n_shards = self.file.num_row_groups
        self.n_rows = self.file.metadata.num_rows

    def shard(self, k: int, columns: list[str] | None = None) -> list[dict]:
        return self.file.read_row_group(k, columns=columns).to_pylist()

    def column(self, name: str) -> list:
        import pyarrow.parquet as pq

        return pq.read_table(self.path, columns=[name]).column(name).to_pylist()


# ------------------------------------------------------------------------------------------- stages


def embed_training_shards(cfg: ScanConfig, out: Path, catalog: Catalog, embedder, procs: _Procs) -> None:
    """Descriptors of the training images, one ``train/train-k.npz`` per shard (bad images recorded)."""
    from diffmem.data import Record, check_record

    store = ShardStore(out, "train", ".npz")
    todo = [k for k in procs.mine(catalog.n_shards) if not store.done(k)]
    for k in _bar(todo, len(todo), "embedding training images", cfg.progress and procs.main):
        rows = catalog.shard(k, ["row", "id", "image"])
        images, positions, bad = [], [], []
        for r in rows:
            image, badrow = check_record(
                Record(r["id"], "-", Path(r["image"]), r["row"]), convert_modes=cfg.convert_modes
            )
            if badrow is None:
                images.append(image)
                positions.append(r["row"])
            else:
                bad.append((r["row"], r["id"], badrow.reason, badrow.detail))
        emb = embedder.embed(images) if images else np.zeros((0, embedder.dim), np.float32)
        store.write_arrays(
            k,
            rows=np.asarray(positions, dtype=np.int64),
            emb=emb.astype(np.float32),
            bad_rows=np.asarray([b[0] for b in bad], dtype=np.int64),
            bad_ids=np.asarray([b[1] for b in bad], dtype=str),
            bad_reasons=np.asarray([b[2] for b in bad], dtype=str),
            bad_details=np.asarray([b[3] for b in bad], dtype=str),
        )


class TrainingSet:
    """All training descriptors in memory (``(n, d)`` float32) with their catalog rows, and the index."""

    def __init__(self, cfg: ScanConfig, out: Path, catalog: Catalog, device=None):
        store = ShardStore(out, "train", ".npz")
        embs, rows, bad = [], [], []
        for k in range(catalog.n_shards):
            a = store.read_arrays(k)
            embs.append(a["emb"])
            rows.append(a["rows"])
            for r, i, reason, detail in zip(a["bad_rows"], a["bad_ids"], a["bad_reasons"], a["bad_details"]):
                bad.append(
                    {
                        "row": int(r),
                        "id": str(i),
                        "reason": str(reason),
                        "detail": str(detail),
                        "stage": "image",
                    }
                )
        self.vectors = np.concatenate(embs) if embs else np.zeros((0, 1), np.float32)
        self.rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        self.bad = bad
        self.bad_rows = {b["row"] for b in bad}
        self.index = None
        if len(self.vectors):
            from diffmem.scan.index import build_index

            self.index = build_index(
                self.vectors, kind=cfg.index, device=device, nprobe=cfg.nprobe, seed=cfg.seed
            )


def _id_lookup(catalog: Catalog) -> dict[int, str]:
    return dict(zip(catalog.column("row"), catalog.column("id")))


def compute_background(cfg: ScanConfig, out: Path, train: TrainingSet) -> None:
    """Somepalli et al.'s background: each (sampled) training image vs its nearest other training image."""
    path = out / "background.npz"
    if path.is_file() or train.index is None:
        return
    from diffmem.scan.index import nearest_other

    n = len(train.vectors)
    take = np.arange(n)
    if cfg.background_sample and n > cfg.background_sample:
        take = np.sort(np.random.default_rng(cfg.seed).choice(n, cfg.background_sample, replace=False))
    sims, pos = nearest_other(train.index, train.vectors[take], take)
    nn_rows = np.where(pos >= 0, train.rows[np.maximum(pos, 0)], -1)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, rows=train.rows[take], sims=sims, nn_rows=nn_rows)

    atomic_write(path, write)


def eligible_rows(cfg: ScanConfig, catalog: Catalog, skip_rows: set[int]) -> set[int] | None:
    """Rows to score: with ``unique_captions``, the first usable row of each distinct caption (a caption
    shared by many training images is generated once); ``None`` = every usable row."""
    if not cfg.unique_captions:
        return None
    seen: set[str] = set()
    keep: set[int] = set()
    for row, caption in zip(catalog.column("row"), catalog.column("caption")):
        if row in skip_rows or caption in seen:
            continue
        seen.add(caption)
        keep.add(row)
    return keep


def score_shards(
    cfg: ScanConfig,
    out: Path,
    catalog: Catalog,
    pipe,
    skip_rows: set[int],
    eligible: set[int] | None,
    procs: _Procs,
) -> None:
    """First-step memorization scores (Wen et al.) of every usable caption, one shard file each."""
    import pyarrow as pa

    from diffmem.detect import score_prompts

    store = ShardStore(out, "scores")
    schema = pa.schema(
        [
            ("row", pa.int64()),
            ("id", pa.string()),
            ("caption", pa.string()),
            ("label", pa.int64()),
            ("score", pa.float32()),
            ("gen_scores", pa.list_(pa.float32())),
        ]
    )
    todo = [k for k in procs.mine(catalog.n_shards) if not store.done(k)]
    for k in _bar(todo, len(todo), "first-step scores", cfg.progress and procs.main):
        rows = [
            r
            for r in catalog.shard(k, ["row", "id", "caption", "label"])
            if r["row"] not in skip_rows and (eligible is None or r["row"] in eligible)
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
        store.write_table(k, pa.Table.from_pylist(table_rows, schema=schema))


def select_for_generation(cfg: ScanConfig, out: Path) -> set[int] | None:
    """Catalog rows to generate for: all scored rows, or (two-stage) the top fraction by score."""
    if cfg.generate == "all":
        return None
    from diffmem.scan.summary import top_fraction

    table = ShardStore(out, "scores").concat(["row", "id", "score"])
    if table is None or table.num_rows == 0:
        return set()
    ids = table.column("id").to_pylist()
    chosen = top_fraction(table.column("score").to_pylist(), ids, cfg.top_fraction)
    return {r for r, i in zip(table.column("row").to_pylist(), ids) if i in chosen}


def _gens_schema():
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
    catalog: Catalog,
    pipe,
    embedder,
    train: TrainingSet,
    ids_by_row: dict[int, str],
    selected: set[int] | None,
    procs: _Procs,
) -> None:
    """Generate ``num_gens`` images per selected caption, embed them, find the nearest training image."""
    import pyarrow as pa
    from PIL import Image

    from diffmem.detect import initial_latents
    from diffmem.scan.carlini import carlini_clique
    from diffmem.seeding import derive_seed

    store = ShardStore(out, "gens")
    scores = ShardStore(out, "scores")
    image_paths = dict(zip(catalog.column("row"), catalog.column("image"))) if cfg.ssim_rerank else {}
    guarded = hasattr(pipe, "memorization_threshold")
    g = cfg.num_gens
    pipe.set_progress_bar_config(disable=True)
    todo = [k for k in procs.mine(catalog.n_shards) if not store.done(k)]
    for k in _bar(todo, len(todo), "generating and searching", cfg.progress and procs.main):
        rows = scores.read_table(k, ["row", "id", "caption"]).to_pylist()
        if selected is not None:
            rows = [r for r in rows if r["row"] in selected]
        out_rows: list[dict] = []
        images_np: list[np.ndarray] = []
        image_cache: dict[int, np.ndarray] = {}
        for b in range(0, len(rows), cfg.batch_size):
            batch = rows[b : b + cfg.batch_size]
            latents = initial_latents(pipe, [r["id"] for r in batch], g, cfg.seed, cfg.height, cfg.width)
            call = dict(
                prompt=[r["caption"] for r in batch],
                num_images_per_prompt=g,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance_scale,
                latents=latents.to(device=pipe._execution_device, dtype=pipe.unet.dtype),
                height=cfg.height,
                width=cfg.width,
                output_type="np",
            )
            if guarded:
                call["memorization_window"] = (0, 1)
            result = pipe(**call)
            imgs = np.asarray(result.images, dtype=np.float32)
            first_step = getattr(result, "memorization_scores", None) or [float("nan")] * len(imgs)
            pil = [Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)) for im in imgs]
            emb = embedder.embed(pil)
            ssim_best = [(None, None)] * len(emb)
            if train.index is not None:
                sims, pos = train.index.search(emb, k=max(1, cfg.ssim_rerank))
                if cfg.ssim_rerank:
                    ssim_best = _ssim_rerank(imgs, pos, train.rows, image_paths, image_cache)
                sims, pos = sims[:, 0], pos[:, 0]
            else:
                sims, pos = np.full(len(emb), np.nan, np.float32), np.full(len(emb), -1)
            for i, r in enumerate(batch):
                clique, min_dist = (None, None)
                if cfg.tiled_l2:
                    clique, min_dist = carlini_clique(list(imgs[i * g : (i + 1) * g]), cfg.carlini_delta)
                for j in range(g):
                    n = i * g + j
                    nn_row = int(train.rows[pos[n]]) if pos[n] >= 0 else -1
                    sim = float(sims[n])
                    out_rows.append(
                        {
                            "row": r["row"],
                            "id": r["id"],
                            "gen": j,
                            "seed": derive_seed(cfg.seed, r["id"], j),
                            "score": float(first_step[n]),
                            "nn_row": nn_row,
                            "nn_id": ids_by_row.get(nn_row),
                            "similarity": sim,
                            "replicated": bool(sim >= embedder.replication_threshold),  # always >=
                            "verbatim": bool(sim >= embedder.verbatim_threshold),
                            "carlini_clique": clique,
                            "carlini_min_dist": min_dist,
                            "ssim": ssim_best[n][0],
                            "ssim_nn_id": ids_by_row.get(ssim_best[n][1]),
                            "ssim_replicated": None
                            if ssim_best[n][0] is None
                            else ssim_best[n][0] >= SSIM_THRESHOLD,
                            "image_file": None,
                        }
                    )
                    images_np.append(pil[n])
        _keep_images(cfg, out, k, out_rows, images_np, embedder.replication_threshold)
        store.write_table(k, pa.Table.from_pylist(out_rows, schema=_gens_schema()))


#: SSIM at or above which a generation counts as a copy of its nearest training image (64 px RGB in
#: [0, 1]; the definition of diffmem-organism-v1, with which the scan results were measured; v2's
#: sharper images need 0.7, see ``diffmem.organism.replication``).
SSIM_THRESHOLD = 0.5


def _ssim_rerank(imgs: np.ndarray, pos: np.ndarray, train_rows: np.ndarray, paths: dict, cache: dict) -> list:
    """For each generation: ``(best SSIM, its catalog row)`` over its ``pos.shape[1]`` nearest training
    images by descriptor, each resized to the generation's size (Wang et al. 2004 via torchmetrics)."""
    import torch
    from PIL import Image

    from diffmem.data import BadImageError, load_rgb
    from diffmem.scores.similarity import ssim

    h, w = imgs.shape[1:3]
    out = []
    for n in range(len(imgs)):
        rows = [int(train_rows[p]) for p in pos[n] if p >= 0]
        cands = []
        for r in rows:
            if r not in cache:
                try:
                    im = load_rgb(paths[r], convert_modes=True).resize((w, h), Image.BICUBIC)
                    cache[r] = np.asarray(im, dtype=np.float32) / 255.0
                except BadImageError:
                    cache[r] = None
            if cache[r] is not None:
                cands.append((r, cache[r]))
        if not cands:
            out.append((None, None))
            continue
        ref = torch.from_numpy(np.stack([c for _, c in cands])).permute(0, 3, 1, 2)
        gen = torch.from_numpy(np.ascontiguousarray(imgs[n])).permute(2, 0, 1)[None].expand_as(ref)
        values = ssim(gen, ref)
        best = int(values.argmax())
        out.append((float(values[best]), cands[best][0]))
    return out


def _keep_images(cfg, out: Path, shard: int, rows: list[dict], images: list, threshold: float) -> None:
    """Save the shard's ``keep_images`` most similar generations and all above ``threshold`` (the global
    worst offenders are among the union of per-shard top lists); written before the shard commits."""
    order = sorted(range(len(rows)), key=lambda i: -np.nan_to_num(rows[i]["similarity"], nan=-2.0))
    keep = set(order[: cfg.keep_images]) | {i for i in order if rows[i]["similarity"] >= threshold}
    for i in sorted(keep):
        rel = f"images/{shard:06d}/{rows[i]['row']}-{rows[i]['gen']}.png"
        atomic_write(out / rel, lambda tmp, im=images[i]: im.save(tmp, format="PNG"))
        rows[i]["image_file"] = rel


# ------------------------------------------------------------------------------------------- driver


def _check_or_write_config(cfg: ScanConfig, out: Path, describe: dict) -> None:
    path = out / "scan.json"
    identity = {**cfg.identity(), "embedder_description": describe}
    if path.is_file():
        old = json.loads(path.read_text())
        old = {**ADDED_KEYS, **old}
        diff = [k for k in set(old) | set(identity) if old.get(k) != identity.get(k)]
        if diff:
            k = sorted(diff)[0]
            raise ValueError(
                f"--out: {out} holds a scan with other settings ({k}: {old.get(k)!r} there, {identity.get(k)!r} now); "
                "rerun with the same settings to resume, or use another --out"
            )
    else:
        atomic_write_json(path, identity)


def run_scan(cfg: ScanConfig, pipe=None, embedder=None) -> dict | None:
    """Run (or resume) a scan; returns the summary on the main process, ``None`` on the others."""
    from diffmem.scan.results import write_summary

    cfg.check()
    out = Path(cfg.out)
    procs = _Procs()
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    needs_images = cfg.generate != "none"
    if embedder is None and needs_images:
        from diffmem.embed import load_embedder

        embedder = load_embedder(
            cfg.embedder,
            cfg.embedder_file,
            arch=cfg.embedder_arch,
            sscd_preprocessing=cfg.sscd_preprocessing,
            allow_torchscript=cfg.allow_torchscript,
            allow_pickle=cfg.allow_pickle,
            pixel_size=cfg.pixel_size,
            device=str(procs.device),
        )
    describe = embedder.describe() if embedder is not None else {}
    if procs.main:
        _check_or_write_config(cfg, out, describe)
        if not (out / "catalog.parquet").is_file():
            build_catalog(cfg, out)
    procs.barrier()
    catalog = Catalog(out)
    timings["catalog_s"] = time.perf_counter() - t0

    if pipe is None:
        from diffmem.attention import use_attention_processor
        from diffmem.modelio import load_pipeline
        from diffmem.precision import torch_dtype

        pipe = load_pipeline(cfg.model, device=procs.device, dtype=torch_dtype(cfg.dtype))
        use_attention_processor(pipe.unet, cfg.attention)

    train = None
    skip: set[int] = set()
    if needs_images:
        t = time.perf_counter()
        embed_training_shards(cfg, out, catalog, embedder, procs)
        procs.barrier()
        train = TrainingSet(cfg, out, catalog, device=procs.device)
        skip = train.bad_rows
        if procs.main:
            compute_background(cfg, out, train)
        timings["embed_index_s"] = time.perf_counter() - t

    t = time.perf_counter()
    score_shards(cfg, out, catalog, pipe, skip, eligible_rows(cfg, catalog, skip), procs)
    procs.barrier()
    timings["score_s"] = time.perf_counter() - t

    if needs_images:
        t = time.perf_counter()
        selected = select_for_generation(cfg, out)
        generate_shards(cfg, out, catalog, pipe, embedder, train, _id_lookup(catalog), selected, procs)
        procs.barrier()
        timings["generate_s"] = time.perf_counter() - t

    if not procs.main:
        return None
    summary = write_summary(cfg, out, describe, train.bad if train is not None else [])
    timings["total_s"] = time.perf_counter() - t0
    atomic_write_json(out / "timings.json", timings)
    if cfg.report:
        from diffmem.scan.report import write_scan_report

        write_scan_report(out)
    return summary
