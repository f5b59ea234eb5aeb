"""Training images without captions (LAION has empty ones; img2dataset output may have none) are
embedded and searched: a scan finds a generation's copy in them.

Ground truth as in ``test_scan``: a training image that *is* the tiny model's generation 0 for a caption
and its id's seed is what a memorizing model reproduces; here that image carries an empty caption, or no
caption at all, in img2dataset's webdataset layout, and the captioned rows hold unrelated images.
"""

# ruff: noqa: F811  (the fixture imported from test_scan is an argument here)
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from test_scan import SCAN, _pipe, one_thread  # noqa: F401  (fixture)

from diffmem.cli import main
from diffmem.data import open_dataset
from diffmem.records import BadRow
from diffmem.scan.layout import EmbeddingLayout
from diffmem.scan.results import load_results
from diffmem.scan.runner import ScanConfig, run_scan

CAPTIONS = {"k0": "a red kettle on a table", "k1": "two dogs in the snow", "k2": "an old wooden door"}


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _noise(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((32, 32)))


@pytest.fixture(scope="module")
def copies(tiny_sd1_dir) -> dict[str, np.ndarray]:
    """The tiny model's generation 0 for each caption at its id's seed (what a scan generates first)."""
    from diffmem.generation import initial_latents

    pipe = _pipe(tiny_sd1_dir)
    out = {}
    for cid, caption in CAPTIONS.items():
        image = pipe(
            prompt=[caption], num_images_per_prompt=SCAN["num_gens"],
            latents=initial_latents(pipe, [cid], SCAN["num_gens"], 0), num_inference_steps=SCAN["steps"],
            guidance_scale=7.5, output_type="np",
        ).images[0]  # fmt: skip
        out[cid] = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return out


def _tar(path: Path, samples: list[dict]) -> None:
    """An img2dataset webdataset shard: ``{key}.png``, ``{key}.txt`` (when the sample has ``txt``),
    ``{key}.json``."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            members = {"png": _png(s["image"]), "json": json.dumps(s["json"]).encode()}
            if "txt" in s:
                members["txt"] = s["txt"].encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{s['key']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _best(out: Path) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for g in load_results(out)["gens"].to_pylist():
        if g["id"] not in best or g["similarity"] > best[g["id"]]["similarity"]:
            best[g["id"]] = g
    return best


def test_readers_keep_caption_less_rows_only_when_told(tmp_path):
    shards = tmp_path / "wds"
    shards.mkdir()
    img = _noise(0)
    _tar(shards / "00000.tar", [
        {"key": "a", "image": img, "txt": "a caption", "json": {"key": "a"}},
        {"key": "b", "image": img, "txt": "  ", "json": {"key": "b"}},
        {"key": "c", "image": img, "json": {"key": "c", "url": "http://x/c.png"}},
    ])  # fmt: skip
    strict = list(open_dataset(shards))
    assert [(x.id, x.reason) for x in strict if isinstance(x, BadRow)] == [
        ("b", "empty_caption"), ("c", "empty_caption")
    ]  # fmt: skip
    loose = list(open_dataset(shards, require_caption=False))
    assert [(x.id, x.caption) for x in loose] == [("a", "a caption"), ("b", None), ("c", None)]
    assert loose[2].extra == {"url": "http://x/c.png"}
    # img2dataset parquet output without a caption column, and an image folder whose captions are blank
    table = tmp_path / "part.parquet"
    pq.write_table(pa.table({"key": ["p0", "p1"], "jpg": [_png(img), _png(img)]}), table)
    with pytest.raises(ValueError, match="no caption column"):
        list(open_dataset(table))
    assert [(x.id, x.caption) for x in open_dataset(table, require_caption=False)] == [
        ("p0", None),
        ("p1", None),
    ]
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(img).save(folder / "x.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "x.png", "text": ""}\n')
    assert [x.caption for x in open_dataset(folder, require_caption=False)] == [None]


def test_scan_finds_copies_among_training_images_without_captions(copies, tiny_sd1_dir, tmp_path):
    """The scan embeds its own --data: the rows without captions are searched but never prompted."""
    shards = tmp_path / "wds"
    shards.mkdir()
    samples = [
        {"key": cid, "image": _noise(i), "txt": cap, "json": {"key": cid}}
        for i, (cid, cap) in enumerate(CAPTIONS.items())
    ]
    samples += [
        {"key": "empty", "image": copies["k0"], "txt": "", "json": {"key": "empty"}},  # empty caption
        {"key": "none", "image": copies["k1"], "json": {"key": "none", "url": "u"}},  # no caption at all
    ]
    _tar(shards / "00000.tar", samples[:3])
    _tar(shards / "00001.tar", samples[3:])
    out = tmp_path / "scan"
    cfg = ScanConfig(data=str(shards), out=str(out), model=str(tiny_sd1_dir), progress=False, **SCAN)
    summary = run_scan(cfg, pipe=_pipe(tiny_sd1_dir))
    best = _best(out)
    assert set(best) == set(CAPTIONS)  # only captioned rows are prompted
    assert best["k0"]["nn_id"] == "empty" and best["k0"]["similarity"] > 0.99 and best["k0"]["verbatim"]
    assert best["k1"]["nn_id"] == "none" and best["k1"]["similarity"] > 0.99 and best["k1"]["verbatim"]
    assert best["k2"]["similarity"] < 0.8 and not best["k2"]["replicated"]
    assert summary["bad_rows"] == 0 and summary["captions_scored"] == 3
    assert summary["training_images_without_caption"] == 2 and summary["usable_rows_not_scored"] == 0
    assert (out / "report.html").is_file()  # the report is drawn with null captions in the catalog


def test_caption_less_img2dataset_output_embeds_and_is_searched(copies, tiny_sd1_dir, tmp_path, capsys):
    """``diffmem embed`` on img2dataset output without any caption, then a scan of a prompt table
    against it: the copy is found."""
    shards = tmp_path / "wds"
    shards.mkdir()
    images = [_noise(10), copies["k0"], _noise(11), _noise(12)]
    _tar(shards / "00000.tar", [
        {"key": f"{i:09d}", "image": im, "json": {"key": f"{i:09d}", "status": "success"}}
        for i, im in enumerate(images)
    ])  # fmt: skip
    emb = tmp_path / "emb"
    assert (
        main(["embed", "--data", str(shards), "--out", str(emb), "--pixel-size", "16", "--no-progress"]) == 0
    )
    summary = json.loads((emb / "embed_summary.json").read_text())
    assert summary["vectors"] == 4 and summary["vectors_without_caption"] == 4 and summary["bad_rows"] == 0
    assert EmbeddingLayout(emb).metadata_column("caption").to_pylist() == [None] * 4
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,caption\n" + "\n".join(f"{c},{CAPTIONS[c]}" for c in ("k0", "k2")) + "\n")
    out = tmp_path / "scan"
    args = ["scan", "--data", str(prompts), "--out", str(out), "--model", str(tiny_sd1_dir),
            "--train-embeddings", str(emb), "--num-gens", "2", "--steps", "2", "--pixel-size", "16",
            "--no-progress", "--no-report"]  # fmt: skip
    assert main(args) == 0
    best = _best(out)
    assert best["k0"]["nn_id"] == "000000001" and best["k0"]["similarity"] > 0.99
    assert best["k2"]["similarity"] < 0.8
    # output in which no sample has an image: one line naming --data and why, not "no img_emb/"
    empty = tmp_path / "noimg"
    empty.mkdir()
    with tarfile.open(empty / "00000.tar", "w") as tar:
        data = b'{"key": "x"}'
        info = tarfile.TarInfo("x.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    capsys.readouterr()
    assert main(["embed", "--data", str(empty), "--out", str(tmp_path / "e2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data" in err[0] and "1 missing_image_path" in err[0], err
