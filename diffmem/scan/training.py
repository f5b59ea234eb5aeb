"""The training side of a scan: the training images' descriptors (a clip-retrieval layout), the index
that searches them, and per position the training row, id and image.

Either the scan embeds ``--data``'s own images into ``DIR/embeddings`` (float32, searched in memory
with the ``--index`` kind), or it reads a prebuilt layout (``--train-embeddings``, made by ``diffmem
embed``) and optionally a prebuilt index over it (``--train-index``, made by ``diffmem index``), whose
candidates are re-ranked exactly from the stored vectors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.data import load_rgb
from diffmem.io import atomic_write, first_difference
from diffmem.records import BadImageError
from diffmem.scan.index import build_index, nearest_other
from diffmem.scan.index_file import IndexFile
from diffmem.scan.layout import EmbeddingLayout, names_embedder


def check_embedder(layout: EmbeddingLayout, describe: dict, argument: str) -> None:
    """Refuse a layout made with another embedder or preprocessing than the scan's (for a declared
    embedder, ``--train-embedder``: another name or dimension)."""
    theirs = layout.embedder
    if theirs.get("declared"):
        if not names_embedder(theirs["embedder"], str(describe.get("embedder"))):
            raise ValueError(
                f"--train-embedder: {theirs['embedder']!r} does not name this scan's embedder "
                f"{describe.get('embedder')!r}; scan with the embedder that made {layout.root}"
            )
        if theirs["dim"] != describe.get("dim"):
            raise ValueError(
                f"{argument}: {layout.root} holds {theirs['dim']}-d vectors, but the scan's embedder "
                f"{describe.get('embedder')!r} makes {describe.get('dim')}-d ones: they are not its vectors"
            )
        return
    k = first_difference(theirs, describe)
    if k is not None:
        raise ValueError(
            f"{argument}: {layout.root} was embedded with another embedder ({k}: {theirs.get(k)!r} there, "
            f"{describe.get(k)!r} in this scan); scan with the same --embedder settings, or re-embed"
        )


#: the cosine a re-embedded training image must keep with its stored vector (float16 storage and
#: another implementation of the same preprocessing stay above 0.99; another embedder falls far below)
REEMBED_MIN_COSINE = 0.95


def check_reembedded(layout: EmbeddingLayout, embedder, n: int = 4) -> int:
    """Re-embed up to ``n`` of a declared layout's images that can be read here and refuse the layout when
    one of them is far from its stored vector; returns how many were compared (0: none reachable)."""
    if not layout.ntotal or "image_path" not in layout.metadata_columns():
        return 0
    images, positions = [], []
    for pos, path in _first_image_paths(layout, 64 * n):  # the first shards' paths only
        if len(images) == n:
            break
        if not path:
            continue
        try:
            images.append(load_rgb(path))
        except (BadImageError, OSError, ValueError):
            continue
        positions.append(pos)
    if not images:
        return 0
    cos = np.sum(embedder.embed(images) * layout.vectors_at(np.asarray(positions)), axis=1)
    worst = int(np.argmin(cos))
    if cos[worst] < REEMBED_MIN_COSINE:
        raise ValueError(
            f"--train-embedder: {layout.root}: image {positions[worst]} re-embedded with "
            f"{embedder.describe().get('embedder')!r} has cosine {cos[worst]:.3f} to its stored vector "
            f"(< {REEMBED_MIN_COSINE}): the vectors were made by another embedder or preprocessing"
        )
    return len(images)


def _first_image_paths(layout: EmbeddingLayout, limit: int):
    """``(position, image_path)`` of the layout's first ``limit`` positions, reading shard by shard."""
    import pyarrow.parquet as pq

    for i, k in enumerate(layout.shards):
        start = int(layout.starts[i])
        if start >= limit:
            return
        if not layout.counts[i] or not layout.metadata_file(k).is_file():
            continue
        paths = pq.read_table(layout.metadata_file(k), columns=["image_path"]).column(0).to_pylist()
        for j, path in enumerate(paths[: limit - start]):
            yield start + j, path


class TrainingSet:
    """Training descriptors, an index over them, and what each position is."""

    def __init__(
        self,
        layout: EmbeddingLayout,
        *,
        index: str = "flat",
        index_file: str | None = None,
        rerank: int = 64,
        nprobe: int = 16,
        index_nprobe: int | None = None,
        seed: int = 0,
        device=None,
        foreign_index: bool = False,
    ):
        import torch

        self.layout = layout
        self.rerank = rerank
        self.rows = layout.rows()
        columns = layout.metadata_columns()
        id_column = layout.id_column()
        self._ids = layout.metadata_column(id_column) if id_column else None  # None: the position
        self._images = layout.metadata_column("image_path") if "image_path" in columns else None
        self.bad = layout.bad_images()
        self.index = None
        self.exact = True  # whether the index's similarities are exact (no re-rank needed)
        device = torch.device(device) if device is not None else None
        gpu = (device.index or 0) if device is not None and device.type == "cuda" else None
        if index_file is not None:
            self.index = IndexFile(
                index_file, layout, nprobe=index_nprobe, gpu_device=gpu, foreign=foreign_index
            )
            self.exact = False
        elif layout.ntotal:
            self.index = build_index(
                layout.all_vectors(), kind=index, device=device, nprobe=nprobe, seed=seed
            )

    def __len__(self) -> int:
        return self.layout.ntotal

    def search(self, queries: np.ndarray, k: int = 1, batch: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """``(similarities, positions)``, each ``(n, k)``, best first. With a prebuilt index, its
        ``max(k, rerank)`` candidates are re-scored exactly (inner product with the stored vectors),
        ``batch`` queries at a time (the candidates' vectors in memory: ``batch x rerank x d`` floats)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self.exact:
            return self.index.search(q, k)
        _, cand = self.index.search(q, max(k, self.rerank))
        k = min(k, cand.shape[1])
        top_s = np.empty((len(q), k), np.float32)
        top_p = np.empty((len(q), k), np.int64)
        for b in range(0, len(q), batch):
            c = cand[b : b + batch]
            vecs = self.layout.vectors_at(c)  # (b, c, d); -1 positions give zero vectors
            sims = np.matmul(vecs, q[b : b + batch, :, None])[..., 0]
            sims[c < 0] = -np.inf
            order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            top_s[b : b + batch] = np.take_along_axis(sims, order, 1)
            top_p[b : b + batch] = np.take_along_axis(c, order, 1)
        top_p[~np.isfinite(top_s)] = -1
        return top_s, top_p

    def row(self, pos: int) -> int:
        return int(self.rows[pos]) if pos >= 0 else -1

    def id(self, pos: int) -> str | None:
        if pos < 0:
            return None
        if self._ids is None:
            return str(pos)
        value = self._ids[pos].as_py()
        return None if value is None else str(value)

    def image(self, pos: int) -> str | None:
        return self._images[pos].as_py() if pos >= 0 and self._images is not None else None


def compute_background(path: Path, train: TrainingSet, sample: int, seed: int) -> None:
    """Somepalli et al.'s background: each (sampled) training image vs its nearest other training
    image, written to ``path`` (``rows``, ``sims``, ``nn_rows``)."""
    if path.is_file() or train.index is None:
        return

    n = len(train)
    take = np.arange(n)
    if sample and n > sample:
        take = np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))
    sims, pos = nearest_other(train, train.layout.vectors_at(take), take)
    nn_rows = np.where(pos >= 0, train.rows[np.maximum(pos, 0)], -1)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, rows=train.rows[take], sims=sims, nn_rows=nn_rows)

    atomic_write(path, write)
