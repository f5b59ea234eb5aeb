"""The settings of one scan (``ScanConfig``) and the record (``scan.json``) a resume must match."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmem.embed import default_embedder
from diffmem.io import atomic_write_json, first_difference
from diffmem.precision import DTYPES
from diffmem.scan.index_file import read_index_record

GENERATE_MODES = ("all", "top", "none")
#: settings that may change between a run and its resume (the attention kernel changes float rounding only)
MARGIN_KEYS = ("progress", "report", "out", "attention")
#: settings added after scans were first written: a scan.json without them was made with these values
ADDED_KEYS = {
    "dtype": "float32",
    "train_embeddings": None,
    "train_index": None,
    "rerank": 64,
    "index_nprobe": None,
    "train_embedder": None,
}

#: SSIM at or above which a generation counts as a copy of its nearest training image (64 px RGB in
#: [0, 1]; the definition of diffmem-organism-v1, with which the scan results were measured; v2's
#: sharper images need 0.7, see ``diffmem.organism.replication``).
SSIM_THRESHOLD = 0.5


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
    embedder: str = field(default_factory=default_embedder)
    embedder_file: str | None = None
    embedder_arch: str | None = None
    sscd_preprocessing: str = "small_288"
    pixel_size: int = 32
    allow_torchscript: bool = False
    allow_pickle: bool = False
    index: str = "flat"
    nprobe: int = 16
    #: a prebuilt training side instead of embedding --data's images: a clip-retrieval layout
    #: (``diffmem embed``) and, optionally, a faiss index over it (``diffmem index``)
    train_embeddings: str | None = None
    train_index: str | None = None
    #: the embedder that made --train-embeddings / --train-index when diffmem did not (its name: a
    #: clip-retrieval folder, an autofaiss index); checked against the vectors' dimension
    train_embedder: str | None = None
    index_nprobe: int | None = None  # IVF lists probed in --train-index (default: its record's)
    rerank: int = 64  # candidates per query re-ranked exactly from the stored vectors (prebuilt side)
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
        for name in ("num_gens", "steps", "shard_size", "batch_size", "pixel_size", "rerank"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"--top-fraction: expected 0 < fraction <= 1, got {self.top_fraction}")
        if self.keep_images < 0 or self.background_sample < 0 or self.ssim_rerank < 0:
            raise ValueError("--keep-images, --background-sample and --ssim-rerank must be >= 0")
        if self.index_nprobe is not None and (
            not isinstance(self.index_nprobe, int) or self.index_nprobe < 1
        ):
            raise ValueError(f"--index-nprobe: expected an integer >= 1, got {self.index_nprobe!r}")
        if self.train_embedder is not None and self.train_embeddings is None and self.train_index is None:
            raise ValueError(
                "--train-embedder: names the embedder of --train-embeddings / --train-index; give one"
            )
        if self.train_index is not None and self.train_embeddings is None:
            self.train_embeddings = _layout_of_index(self.train_index)

    def identity(self) -> dict[str, Any]:
        d = asdict(self)
        for k in MARGIN_KEYS:
            d.pop(k)
        d["data"] = str(Path(self.data).resolve())
        for k in ("train_embeddings", "train_index"):
            if d[k] is not None:
                d[k] = str(Path(d[k]).resolve())
        return d

    @property
    def min_clique(self) -> int:
        return self.carlini_min_clique or max(2, min(10, self.num_gens))

    @property
    def prebuilt(self) -> bool:
        """Whether the training side is a prebuilt layout/index rather than --data's own images."""
        return self.train_embeddings is not None


def _layout_of_index(index_file: str) -> str:

    return read_index_record(index_file, argument="--train-index")["embeddings"]


def check_or_write_config(cfg: ScanConfig, out: Path, describe: dict) -> None:
    """Write ``scan.json``, or refuse (naming the first differing setting) a resume with other settings."""
    path = out / "scan.json"
    identity = {**cfg.identity(), "embedder_description": describe}
    if path.is_file():
        old = json.loads(path.read_text())
        old = {**ADDED_KEYS, **old}
        k = first_difference(old, identity)
        if k is not None:
            raise ValueError(
                f"--out: {out} holds a scan with other settings ({k}: {old.get(k)!r} there, {identity.get(k)!r} now); "
                "rerun with the same settings to resume, or use another --out"
            )
    else:
        atomic_write_json(path, identity)
