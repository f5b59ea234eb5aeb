"""Training sides made by the ecosystem's tools, read as those tools write them: a clip-retrieval
folder (``img_emb/img_emb_0.npy`` padded to its partition count, ``metadata/metadata_0.parquet`` with
``image_path``, ``caption``, ``url``, ..., no ``embeddings.json``) and an autofaiss-style index (built
here with faiss's factory string, LAION's kind, no diffmem record), the embedder declared by name.

Ground truth: the vectors' positions (the ids of any index built over the folder in file order), and the
planted scan of ``test_scan``, whose nearest training images a scan over the same vectors in
clip-retrieval's layout must find again.
"""

# ruff: noqa: F811  (the fixtures imported from test_scan / test_scan_prebuilt are arguments here)
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_scan import SCAN, _pipe, one_thread, planted, reference  # noqa: F401  (fixtures)
from test_scan_prebuilt import _clustered, _pixel, layout16  # noqa: F401  (fixture)

from diffmem.cli import main
from diffmem.scan.index_file import IndexFile
from diffmem.scan.layout import EmbeddingLayout
from diffmem.scan.results import load_results
from diffmem.scan.runner import ScanConfig, run_scan
from diffmem.scan.training import TrainingSet, check_embedder, check_reembedded

faiss = pytest.importorskip("faiss")


def _clip_retrieval(root: Path, blocks: list[np.ndarray], metadata: list[dict], pad: int) -> Path:
    """A folder as ``clip-retrieval inference`` writes it: shard numbers padded to ``pad`` digits,
    float16 vectors, metadata columns of its own (``metadata`` rows: image_path, caption, url, ...)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    schema = pa.Table.from_pylist(metadata[:1]).schema  # (an empty shard keeps the columns)
    start = 0
    for k, block in enumerate(blocks):
        np.save(root / "img_emb" / f"img_emb_{k:0{pad}d}.npy", block.astype(np.float16))
        rows = metadata[start : start + len(block)]
        pq.write_table(
            pa.Table.from_pylist(rows, schema=schema), root / "metadata" / f"metadata_{k:0{pad}d}.parquet"
        )
        start += len(block)
    return root


def _meta(n: int, key: bool = False) -> list[dict]:
    return [
        {"image_path": f"/images/{i}.jpg", "caption": f"caption {i}", "url": f"http://example.com/{i}.jpg",
         **({"key": f"{i:09d}"} if key else {})}
        for i in range(n)
    ]  # fmt: skip


def test_clip_retrieval_folder_is_read_as_written(tmp_path):
    vecs = _clustered(25, 8, 0)
    blocks = [vecs[:10], vecs[10:20], vecs[20:]]
    root = _clip_retrieval(tmp_path / "cr", blocks, _meta(25), pad=2)
    assert (root / "img_emb" / "img_emb_00.npy").is_file()
    # no embeddings.json: the embedder must be declared
    with pytest.raises(FileNotFoundError, match="--train-embedder"):
        EmbeddingLayout(root)
    layout = EmbeddingLayout(root, declared="open_clip:ViT-B-32")
    assert layout.embedder == {"embedder": "open_clip:ViT-B-32", "dim": 8, "declared": True}
    assert layout.ntotal == 25 and layout.shards == [0, 1, 2]
    np.testing.assert_allclose(layout.all_vectors(), vecs, atol=2e-3)
    # no id / row columns: ids and rows are positions; image_path is clip-retrieval's
    assert layout.id_column() is None and layout.rows().tolist() == list(range(25))
    train = TrainingSet(layout)
    sims, pos = train.search(vecs[[3, 17]], k=1)
    assert pos[:, 0].tolist() == [3, 17] and train.id(17) == "17" and train.image(17) == "/images/17.jpg"
    # the declared name must name the scan's embedder, and the dimension must be its
    check_embedder(layout, {"embedder": "open_clip:ViT-B-32:weights.pt", "dim": 8}, "--train-embeddings")
    with pytest.raises(ValueError, match="--train-embedder: 'open_clip:ViT-B-32' does not name"):
        check_embedder(layout, {"embedder": "open_clip:ViT-L-14:weights.pt", "dim": 8}, "--train-embeddings")
    with pytest.raises(ValueError, match="8-d vectors.* makes 16-d"):
        check_embedder(layout, {"embedder": "open_clip:ViT-B-32:w.pt", "dim": 16}, "--train-embeddings")
    # img2dataset's key, where clip-retrieval carried it over, is the id
    keyed = _clip_retrieval(tmp_path / "keyed", blocks, _meta(25, key=True), pad=1)
    keyed_train = TrainingSet(EmbeddingLayout(keyed, declared="x"))
    assert keyed_train.id(12) == "000000012"


def test_shard_numbers_in_any_padding_are_ordered_by_number(tmp_path):
    vecs = _clustered(12 * 3, 4, 1)
    blocks = [vecs[3 * k : 3 * k + 3] for k in range(12)]
    root = _clip_retrieval(tmp_path / "cr", blocks, _meta(36), pad=1)  # img_emb_2 ... img_emb_10
    layout = EmbeddingLayout(root, declared="x")
    assert layout.shards == list(range(12))
    np.testing.assert_allclose(layout.all_vectors(), vecs, atol=2e-3)
    assert layout.metadata_column("url").to_pylist()[30] == "http://example.com/30.jpg"
    shutil.copy(root / "img_emb" / "img_emb_0.npy", root / "img_emb" / "img_emb_00.npy")
    with pytest.raises(ValueError, match="two files of shard 0"):
        EmbeddingLayout(root, declared="x")


def test_declared_embedder_is_checked_on_re_embedded_images(tmp_path, layout16):
    """Where the folder's images can be read, a few are re-embedded with the scan's embedder."""
    src = EmbeddingLayout(layout16[0])
    paths = src.metadata_column("image_path").to_pylist()
    meta = [
        {"image_path": p, "caption": c} for p, c in zip(paths, src.metadata_column("caption").to_pylist())
    ]
    good = _clip_retrieval(tmp_path / "good", [src.all_vectors()], meta, pad=1)
    assert check_reembedded(EmbeddingLayout(good, declared="pixel16"), _pixel()) == 4
    wrong = _clustered(src.ntotal, src.dim, 3)  # vectors of the right size from "another embedder"
    bad = _clip_retrieval(tmp_path / "bad", [wrong], meta, pad=1)
    with pytest.raises(ValueError, match="--train-embedder: .*re-embedded with 'pixel16' has cosine"):
        check_reembedded(EmbeddingLayout(bad, declared="pixel16"), _pixel())
    # a record that names another embedder than the declared one is refused
    with pytest.raises(ValueError, match="names the embedder 'pixel16', not 'sscd'"):
        EmbeddingLayout(layout16[0], declared="sscd")


def _autofaiss_like(layout: EmbeddingLayout, path: Path, factory: str) -> None:
    """What autofaiss builds: a faiss factory string, trained on the vectors, added in file order (ids =
    positions), written without any diffmem record."""
    vecs = layout.all_vectors()
    index = faiss.index_factory(layout.dim, factory, faiss.METRIC_INNER_PRODUCT)
    if "PQ" in factory:  # (the polysemous code permutation, unused at polysemous_ht = 0: a minute saved)
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
    index.train(vecs)
    index.add(vecs)
    faiss.write_index(index, str(path))


def test_autofaiss_style_index_is_searched_with_its_embedder_declared(tmp_path):
    base = _clustered(4000, 64, 0)
    blocks = [base[s : s + 1000] for s in range(0, 4000, 1000)]
    layout = EmbeddingLayout(_clip_retrieval(tmp_path / "cr", blocks, _meta(4000), pad=1), declared="clip")
    path = tmp_path / "knn.index"
    _autofaiss_like(layout, path, "OPQ16_64,IVF16,PQ16x8")  # LAION's kind of index
    with pytest.raises(FileNotFoundError, match="no record .*--train-embeddings .*--train-embedder"):
        IndexFile(path, layout)
    index = IndexFile(path, layout, foreign=True)
    assert index.record["kind"] == "foreign" and index.record["index_type"] == "IndexPreTransform"
    assert index.record["nlist"] == 16 and index.record["nprobe"] == 16  # all lists (saved with nprobe 1)
    assert index.record["embedder"] == {"embedder": "clip", "dim": 64, "declared": True}
    stored = layout.all_vectors()
    rng = np.random.default_rng(1)
    src = rng.choice(4000, 100, replace=False)
    near = base[src] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    train = TrainingSet(layout, index_file=str(path), foreign_index=True, rerank=64)
    sims, pos = train.search(near, k=3)
    assert (pos[:, 0] == src).mean() >= 0.95  # the copied vector comes first
    np.testing.assert_allclose(sims, np.einsum("nkd,nd->nk", stored[pos], near), atol=1e-6)  # exact
    # an index over other vectors (another count or dimension) is refused, naming both
    fewer = EmbeddingLayout(
        _clip_retrieval(tmp_path / "few", blocks[:3], _meta(3000), pad=1), declared="clip"
    )
    with pytest.raises(ValueError, match="4000 vectors of dimension 64, but .* 3000 of dimension 64"):
        IndexFile(path, fewer, foreign=True)
    # a scan given only the index (no record to name its folder) is told what to add
    with pytest.raises(FileNotFoundError, match="--train-embeddings"):
        ScanConfig(data="x", out=str(tmp_path / "s"), train_index=str(path), train_embedder="clip").check()


def _nn(out: Path, rows: set[int] | None = None) -> list[tuple]:
    gens = load_results(out)["gens"].to_pylist()
    return sorted(
        (g["row"], g["gen"], g["nn_id"], g["nn_image"], round(g["ssim"], 4))
        for g in gens
        if rows is None or g["row"] in rows
    )


def test_scan_over_clip_retrieval_folder_and_foreign_index_finds_the_same_neighbours(
    reference, planted, layout16, tiny_sd1_dir, tmp_path, capsys
):
    ref_out, ref_summary, _ = reference
    src = EmbeddingLayout(layout16[0])
    meta = [
        {"image_path": p, "caption": c, "url": f"http://example.com/{i}", "key": k}
        for p, c, i, k in zip(
            src.metadata_column("image_path").to_pylist(), src.metadata_column("caption").to_pylist(),
            range(src.ntotal), src.metadata_column("id").to_pylist(),
        )
    ]  # fmt: skip
    blocks = [src.shard_vectors(i) for i in range(len(src.files))]
    folder = _clip_retrieval(tmp_path / "cr", blocks, meta, pad=1)
    index = tmp_path / "knn.index"
    _autofaiss_like(EmbeddingLayout(folder, declared="pixel16"), index, "IVF2,Flat")
    ref_rows = {g[0] for g in _nn(ref_out)}
    # `diffmem index` over the folder, its embedder declared: the record names the folder for the scan
    own = tmp_path / "own.index"
    assert main(["index", "--embeddings", str(folder), "--out", str(own), "--train-embedder", "pixel16",
                 "--no-progress"]) == 0  # fmt: skip
    common = dict(data=str(planted), model=str(tiny_sd1_dir), progress=False, report=False, **SCAN)
    for name, extra in (
        ("folder", {"train_embeddings": str(folder)}),
        ("index", {"train_embeddings": str(folder), "train_index": str(index)}),
        ("diffmem-index", {"train_index": str(own)}),
    ):
        out = tmp_path / name
        cfg = ScanConfig(out=str(out), train_embedder="pixel16", **extra, **common)
        summary = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
        # clip-retrieval keeps no record of images that did not load: the captions of the 3 rows whose
        # image is unreadable are generated too here; every row of the reference gets the same neighbour
        assert _nn(out, ref_rows) == _nn(ref_out), name
        assert len(_nn(out)) == len(_nn(ref_out)) + 3 * SCAN["num_gens"]
        assert summary["captions_verbatim"] == ref_summary["captions_verbatim"] == 3
    # without the declaration, or declaring another embedder: one line, exit 2
    args = ["scan", "--data", str(planted), "--out", str(tmp_path / "cli"), "--model", str(tiny_sd1_dir),
            "--train-embeddings", str(folder), "--pixel-size", "16", "--no-progress"]  # fmt: skip
    for extra, needle in (([], "--train-embedder"), (["--train-embedder", "pixel8"], "does not name")):
        capsys.readouterr()
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err


def test_unreadable_images_do_not_block_a_declared_folder(tmp_path):
    """Images that are not here (LAION's are URLs) leave the check to the dimension."""
    vecs = _clustered(5, 4, 2)
    root = _clip_retrieval(tmp_path / "cr", [vecs], _meta(5), pad=1)  # /images/*.jpg do not exist
    assert check_reembedded(EmbeddingLayout(root, declared="pixel2"), _NeverCalled()) == 0


class _NeverCalled:
    """An embedder stand-in that fails if it is asked to embed anything."""

    def embed(self, images):
        raise AssertionError("no image should have been embedded")

    def describe(self):
        return {"embedder": "pixel2", "dim": 4}
