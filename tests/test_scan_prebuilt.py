"""Scans at scale: a training set embedded once into clip-retrieval's layout (``diffmem embed``), a faiss
index built over it shard by shard and read memory-mapped (``diffmem index``), and scans that search
them (``--train-embeddings`` / ``--train-index``) instead of embedding their own images.

Ground truth: the planted folder of ``test_scan`` (three captions whose training image is the tiny
model's own generation) scanned the built-in way; a prebuilt exact index must give the same nearest
training image for every generation.
"""

# ruff: noqa: F811  (the fixtures imported from test_scan are arguments here)
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_scan import SCAN, _pipe, one_thread, planted, reference  # noqa: F401  (fixtures)

from diffmem.cli import main
from diffmem.embed import load_embedder
from diffmem.scan.embedding import embed_dataset
from diffmem.scan.index_file import IndexFile, build_index_file, index_parameters
from diffmem.scan.layout import EmbeddingLayout, write_vectors
from diffmem.scan.results import load_results
from diffmem.scan.runner import ScanConfig, run_scan
from diffmem.scan.training import TrainingSet


def _pixel():
    return load_embedder("pixel", pixel_size=SCAN["pixel_size"])


def _usable(folder: Path) -> list[dict]:
    """The rows of the planted folder whose image loads, caption or not, in order (what a layout must hold)."""
    from diffmem.data import check_record, open_dataset
    from diffmem.records import BadRow

    rows = []
    for item in open_dataset(folder, require_caption=False):
        if isinstance(item, BadRow):
            continue
        image, bad = check_record(item)
        if bad is None:
            rows.append({"id": item.id, "image": image, "path": str(item.image), "row": item.row})
    return rows


@pytest.fixture(scope="module")
def layout16(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "planted16"
    summary = embed_dataset(str(planted), out, _pixel(), shard_size=3, progress=False)
    return out, summary


def test_layout_round_trip(planted, layout16, tmp_path):
    out, summary = layout16
    usable = _usable(planted)
    layout = EmbeddingLayout(out)
    # the clip-retrieval file names, float16 shards of at most shard_size rows
    assert sorted(p.name for p in (out / "img_emb").iterdir())[0] == "img_emb_0000.npy"
    assert (out / "metadata" / "metadata_0000.parquet").is_file()
    assert np.load(out / "img_emb" / "img_emb_0000.npy").dtype == np.float16
    assert layout.ntotal == len(usable) == summary["vectors"]
    assert layout.metadata_column("id").to_pylist() == [u["id"] for u in usable]
    assert layout.metadata_column("row").to_pylist() == [u["row"] for u in usable]
    assert layout.metadata_column("image_path").to_pylist() == [u["path"] for u in usable]
    expected = _pixel().embed([u["image"] for u in usable])
    np.testing.assert_allclose(layout.all_vectors(), expected, atol=1e-3)
    # position access reads the same rows as whole shards (-1 = no row)
    pos = np.asarray([[4, 0], [-1, len(usable) - 1]])
    got = layout.vectors_at(pos)
    np.testing.assert_array_equal(got[0, 0], layout.all_vectors()[4])
    np.testing.assert_array_equal(got[1, 0], np.zeros(layout.dim))
    # every bad row is kept with its reason: unreadable images here, the others while reading
    image_reasons = sorted(b["reason"] for b in layout.bad_images())
    assert image_reasons == ["cmyk_image", "corrupt_image", "high_bit_depth"]
    assert summary["bad_rows_by_reason"] == {
        "cmyk_image": 1, "corrupt_image": 1, "duplicate_id": 1, "high_bit_depth": 1, "missing_file": 1,
    }  # fmt: skip
    # the row with an empty caption is embedded, its caption recorded as missing
    assert summary["vectors_without_caption"] == 1
    assert layout.metadata_column("caption").to_pylist()[[u["id"] for u in usable].index("blank")] is None
    assert layout.embedder == _pixel().describe()
    # float32 keeps the embedder's output exactly
    out32 = tmp_path / "f32"
    embed_dataset(str(planted), out32, _pixel(), shard_size=3, dtype="float32", progress=False)
    np.testing.assert_array_equal(EmbeddingLayout(out32).all_vectors(), expected)
    # a rerun is a no-op; other settings are refused
    before = {p: p.stat().st_mtime_ns for p in (out / "img_emb").iterdir()}
    embed_dataset(str(planted), out, _pixel(), shard_size=3, progress=False)
    assert before == {p: p.stat().st_mtime_ns for p in (out / "img_emb").iterdir()}
    with pytest.raises(ValueError, match="other settings .*shard_size"):
        embed_dataset(str(planted), out, _pixel(), shard_size=4, progress=False)


def _clustered(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, d))
    x = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write_layout(root: Path, vectors: np.ndarray, shard: int) -> EmbeddingLayout:
    blocks = [vectors[s : s + shard] for s in range(0, len(vectors), shard)]
    return write_vectors(root, blocks, {"embedder": "synthetic"})


def test_index_parameters_follow_the_rule():
    assert index_parameters(6000, 64)["kind"] == "flat"  # small sets are searched exactly
    params = index_parameters(10_000_000, 128)
    assert (params["factory"], params["nprobe"]) == ("IVF4096,PQ32x4fs", 64)  # 16 bytes a vector
    assert index_parameters(10_000_000, 128, "ivfpq8")["factory"] == "IVF4096,PQ16"  # the same, 8-bit codes
    assert index_parameters(1_000_000, 512)["factory"] == "IVF1024,PQ128x4fs"


@pytest.mark.parametrize(
    "kind, factory, copies_first, fresh_first",
    [
        ("ivfpq", "IVF64,PQ16x4fs", 0.9, 0.5),
        ("ivfpq8", "IVF64,PQ8", 0.95, 0.9),
    ],  # floors under the seeded run
)
def test_index_built_here_is_read_memory_mapped_and_reranked_exactly(
    tmp_path, kind, factory, copies_first, fresh_first
):
    base = _clustered(6000, 64, 0)
    layout = _write_layout(tmp_path / "emb", base, shard=1000)
    stored = layout.all_vectors()
    path = tmp_path / f"{kind}.index"
    record = build_index_file(layout, path, kind=kind, progress=False)
    assert record["factory"] == factory and record["ntotal"] == 6000
    assert json.loads(Path(f"{path}.json").read_text())["embedder"] == {"embedder": "synthetic"}
    index = IndexFile(path, layout)
    assert index.kind == kind and index.ntotal == 6000
    # queries: near-copies of known training vectors (what a replication looks like) and fresh draws
    rng = np.random.default_rng(1)
    src = rng.choice(6000, 100, replace=False)
    near = base[src] + 0.05 * rng.standard_normal((100, 64)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    train = TrainingSet(layout, index_file=str(path), rerank=64)
    sims, pos = train.search(near, k=3)
    assert (pos[:, 0] == src).mean() >= copies_first  # the copied training vector comes first
    # the reported similarities are exact inner products with the stored vectors, not PQ estimates
    np.testing.assert_allclose(sims, np.einsum("nkd,nd->nk", stored[pos], near), atol=1e-6)
    approx, _ = index.search(near, k=1)
    assert np.abs(approx[:, 0] - sims[:, 0]).max() > 1e-4  # (which differ)
    # against exact search over the same stored vectors
    fresh = _clustered(200, 64, 2)
    exact_pos = np.argmax(fresh @ stored.T, axis=1)
    _, got = train.search(fresh, k=1)
    assert (got[:, 0] == exact_pos).mean() >= fresh_first
    # an index made over other embeddings is refused, and so is one without its record
    other = _write_layout(tmp_path / "other", base[:5000], shard=1000)
    with pytest.raises(ValueError, match="another set of embeddings"):
        IndexFile(path, other)
    Path(f"{path}.json").unlink()
    with pytest.raises(FileNotFoundError, match="no record"):
        IndexFile(path, layout)


def _nn(out: Path) -> list[tuple]:
    gens = load_results(out)["gens"].to_pylist()
    return sorted((g["row"], g["gen"], g["nn_id"], g["nn_row"], g["nn_image"]) for g in gens)


def test_scan_against_a_prebuilt_index_finds_the_same_neighbours(
    reference, planted, layout16, tiny_sd1_dir, tmp_path
):
    ref_out, ref_summary, _ = reference
    emb_dir, _ = layout16
    assert (
        main(
            ["index", "--embeddings", str(emb_dir), "--out", str(tmp_path / "planted.index"), "--no-progress"]
        )
        == 0
    )
    assert json.loads((tmp_path / "planted.index.json").read_text())["kind"] == "flat"
    out = tmp_path / "prebuilt"
    cfg = ScanConfig(
        data=str(planted), out=str(out), model=str(tiny_sd1_dir), progress=False, report=False,
        train_index=str(tmp_path / "planted.index"), **SCAN,
    )  # fmt: skip
    summary = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    assert cfg.train_embeddings == str(emb_dir.resolve())  # found from the index's record
    assert _nn(out) == _nn(ref_out)
    a = sorted(load_results(ref_out)["gens"].to_pylist(), key=lambda g: (g["row"], g["gen"]))
    b = sorted(load_results(out)["gens"].to_pylist(), key=lambda g: (g["row"], g["gen"]))
    np.testing.assert_allclose([g["similarity"] for g in b], [g["similarity"] for g in a], atol=2e-3)
    assert [g["ssim_nn_id"] for g in b] == [g["ssim_nn_id"] for g in a]
    for key in ("captions_scored", "captions_replicated", "captions_verbatim"):
        assert summary[key] == ref_summary[key], key
    # with a prebuilt training side --data is prompts only: its row with an empty caption is a bad row
    # (in the reference it is a training image without a caption)
    assert summary["bad_rows_by_reason"] == {**ref_summary["bad_rows_by_reason"], "empty_caption": 1}
    # the layout alone (no index file): searched exactly in memory, the same neighbours
    out2 = tmp_path / "layout-only"
    cfg2 = ScanConfig(
        data=str(planted), out=str(out2), model=str(tiny_sd1_dir), progress=False, report=False,
        train_embeddings=str(emb_dir), **SCAN,
    )  # fmt: skip
    run_scan(cfg2, pipe=_pipe(tiny_sd1_dir))
    assert _nn(out2) == _nn(ref_out)


def test_scan_with_another_embedder_is_refused(planted, layout16, tiny_sd1_dir, tmp_path, capsys):
    emb_dir, _ = layout16
    cfg = ScanConfig(
        data=str(planted), out=str(tmp_path / "x"), model=str(tiny_sd1_dir), progress=False,
        train_embeddings=str(emb_dir), **{**SCAN, "pixel_size": 8},
    )  # fmt: skip
    with pytest.raises(ValueError, match="another embedder .*dim"):
        run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    args = ["scan", "--data", str(planted), "--out", str(tmp_path / "y"), "--model", str(tiny_sd1_dir),
            "--train-embeddings", str(emb_dir), "--pixel-size", "8", "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-embeddings" in err[0] and "another embedder" in err[0]


def test_embed_reads_img2dataset_webdataset_shards(planted, layout16, tmp_path):
    """The same images as tar shards in img2dataset's layout embed to the same vectors."""
    usable = _usable(planted)
    shards = tmp_path / "wds"
    shards.mkdir()
    for s in range(0, len(usable), 4):
        with tarfile.open(shards / f"{s // 4:05d}.tar", "w") as tar:
            for u in usable[s : s + 4]:
                key = f"{u['row']:09d}"
                src = Path(u["path"])
                tar.add(src, arcname=f"{key}{src.suffix}")
                caption = tmp_path / "caption.txt"
                caption.write_text(f"caption of {u['id']}")
                tar.add(caption, arcname=f"{key}.txt")
    out = tmp_path / "emb"
    summary = embed_dataset(str(shards), out, _pixel(), shard_size=3, progress=False)
    assert summary["bad_rows"] == 0 and summary["vectors"] == len(usable)
    np.testing.assert_array_equal(
        EmbeddingLayout(out).all_vectors(), EmbeddingLayout(layout16[0]).all_vectors()
    )
    refs = EmbeddingLayout(out).metadata_column("image_path").to_pylist()
    assert all("::" in r and r.split("::")[0].endswith(".tar") for r in refs)


@pytest.fixture(scope="module")
def sscd_onnx(tmp_path_factory):
    """An SSCD-architecture embedder (ResNet-50, 512-d head, random weights) as an ONNX file."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, 512)
    path = tmp_path_factory.mktemp("sscd") / "sscd_like.onnx"
    torch.onnx.export(
        model.eval(), (torch.zeros(1, 3, 288, 288),), str(path), dynamo=False, input_names=["image"],
        output_names=["embedding"], dynamic_axes={"image": {0: "batch", 2: "height", 3: "width"}, "embedding": {0: "batch"}},
    )  # fmt: skip
    return path


def _embed_cli(data: Path, out: Path, onnx: Path) -> list[str]:
    return ["embed", "--data", str(data), "--out", str(out), "--embedder", "sscd", "--embedder-file", str(onnx),
            "--sscd-preprocessing", "dcr_224", "--shard-size", "2", "--no-progress"]  # fmt: skip


@pytest.mark.slow
def test_sigkilled_embed_resumes_to_the_same_layout(planted, sscd_onnx, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    assert main(_embed_cli(planted, ref, sscd_onnx)) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "diffmem", *_embed_cli(planted, out, sscd_onnx)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "img_emb").is_dir() and len(list((out / "img_emb").glob("img_emb_*.npy"))) >= 1:
            break
        time.sleep(0.01)
    assert proc.poll() is None, (
        "embed finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_ref = len(list((ref / "img_emb").glob("*.npy")))
    assert 1 <= len(list((out / "img_emb").glob("*.npy"))) < n_ref
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    _same_layout(ref, out)
    assert list(out.rglob("*.tmp")) == []  # the killed write's temporary file (if any) is gone


def _same_layout(a: Path, b: Path) -> None:
    la, lb = EmbeddingLayout(a), EmbeddingLayout(b)
    assert la.shards == lb.shards and la.counts.tolist() == lb.counts.tolist()
    np.testing.assert_array_equal(la.all_vectors(), lb.all_vectors())
    for col in ("id", "row", "image_path", "caption"):
        assert la.metadata_column(col).to_pylist() == lb.metadata_column(col).to_pylist()
    assert la.bad_images() == lb.bad_images()


@pytest.mark.slow
def test_accelerate_two_processes_embed_the_same_layout(planted, layout16, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out = tmp_path / "two"
    cmd = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffmem",
        "embed", "--data", str(planted), "--out", str(out), "--pixel-size", str(SCAN["pixel_size"]),
        "--shard-size", "3", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _same_layout(layout16[0], out)
    assert json.loads((out / "embed_summary.json").read_text())["processes"] == 2


def test_embed_and_index_cli_errors_are_one_line(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    cases = [
        (["embed", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "--data"),
        (["embed", "--data", str(folder), "--out", str(tmp_path / "o"), "--shard-size", "0"], "--shard-size"),
        (["index", "--embeddings", str(folder), "--out", str(tmp_path / "i")], "--embeddings"),
        (["scan", "--data", str(folder), "--out", str(tmp_path / "s"), "--train-index", str(tmp_path / "none.index")],
         "--train-index"),
    ]  # fmt: skip
    for args, name in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0], (args, err)
