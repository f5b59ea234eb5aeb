"""diffmem.data: reading image folders and tables, bad rows with reasons, image loading, writing."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffmem.data import (
    ImageFolderWriter,
    check_record,
    load_rgb,
    open_dataset,
    split_rows,
    write_image_folder,
)
from diffmem.records import REASONS, BadImageError, BadRow, Record


def _png_rgb16(path, arr16: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = arr16.shape
    raw = b"".join(b"\x00" + arr16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _rand_image(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture()
def messy_folder(tmp_path):
    """An image folder with one row of every kind of problem."""
    folder = tmp_path / "ds"
    write_image_folder(folder, [(f"img{i}", f"caption {i}", _rand_image(i)) for i in range(3)])
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(folder / "gray16.png")
    _png_rgb16(folder / "rgb16.png", np.full((4, 4, 3), 51400, dtype=np.uint16))
    (folder / "corrupt.png").write_bytes(b"not an image at all")
    Image.fromarray(_rand_image(9, 64)).save(folder / "full.png")
    (folder / "truncated.png").write_bytes((folder / "full.png").read_bytes()[:300])
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(folder / "alpha.png")
    extra = [
        {"file_name": "cmyk.jpg", "id": "cmyk", "text": "a cmyk image"},
        {"file_name": "gray16.png", "id": "gray16", "text": "a 16-bit grey image"},
        {"file_name": "rgb16.png", "id": "rgb16", "text": "a 16-bit rgb image"},
        {"file_name": "corrupt.png", "id": "corrupt", "text": "not an image"},
        {"file_name": "truncated.png", "id": "truncated", "text": "cut short"},
        {"file_name": "alpha.png", "id": "alpha", "text": "transparent"},
        {"file_name": "gone.png", "id": "gone", "text": "missing file"},
        {"file_name": "img0.png", "id": "img0", "text": "duplicate id"},
        {"file_name": "img1.png", "id": "empty", "text": "   "},
        {"file_name": "img1.png", "id": "", "text": "no id"},
    ]
    with open(folder / "metadata.jsonl", "a", encoding="utf-8") as f:
        for row in extra:
            f.write(json.dumps(row) + "\n")
        f.write("{broken json\n")
    return folder


def test_image_folder_rows_and_reasons(messy_folder):
    items = list(open_dataset(messy_folder))
    good, bad = split_rows(items)
    assert [r.id for r in good] == [
        "img0",
        "img1",
        "img2",
        "cmyk",
        "gray16",
        "rgb16",
        "corrupt",
        "truncated",
        "alpha",
    ]
    assert [r.row for r in items] == list(range(len(items)))  # source order, every row accounted for
    assert [(b.id, b.reason) for b in bad] == [
        ("gone", "missing_file"),
        ("img0", "duplicate_id"),
        ("empty", "empty_caption"),
        (None, "missing_id"),
        (None, "malformed_row"),
    ]
    assert all(b.reason in REASONS for b in bad)
    assert good[0].caption == "caption 0" and good[0].image == messy_folder / "img0.png"

    checked = {r.id: check_record(r) for r in good}
    image_reasons = {k: bad.reason for k, (_, bad) in checked.items() if bad is not None}
    assert image_reasons == {
        "cmyk": "cmyk_image",
        "gray16": "high_bit_depth",
        "rgb16": "high_bit_depth",
        "corrupt": "corrupt_image",
        "truncated": "truncated_image",
    }
    img0, _ = checked["img0"]
    assert img0.mode == "RGB" and np.array_equal(np.asarray(img0), _rand_image(0))
    alpha, _ = checked["alpha"]
    assert np.asarray(alpha)[0, 0].tolist() == [255, 255, 255]  # transparent composited on white


def test_missing_id_row(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "t.csv").write_text("id,caption,image\n,hello,a.png\nx,hi,a.png\n")
    items = list(open_dataset(tmp_path / "t.csv"))
    assert isinstance(items[0], BadRow) and items[0].reason == "missing_id"
    assert isinstance(items[1], Record) and items[1].id == "x"


def test_convert_modes_scales_not_clips(messy_folder):
    gray = load_rgb(messy_folder / "gray16.png", convert_modes=True)
    assert np.asarray(gray)[0, 0].tolist() == [round(40000 / 257)] * 3
    rgb = load_rgb(messy_folder / "rgb16.png", convert_modes=True)
    assert np.asarray(rgb)[0, 0].tolist() == [200, 200, 200]  # 51400 = 200 * 257
    cmyk = load_rgb(messy_folder / "cmyk.jpg", convert_modes=True)
    assert cmyk.mode == "RGB"
    with pytest.raises(BadImageError) as err:
        load_rgb(messy_folder / "corrupt.png", convert_modes=True)
    assert err.value.reason == "corrupt_image"


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_tables(tmp_path, fmt):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(_rand_image(i)).save(images / f"{i}.png")
    rows = [{"key": f"k{i}", "prompt": f"p {i}", "path": f"imgs/{i}.png", "label": i % 2} for i in range(3)]
    rows.append({"key": "k1", "prompt": "dup", "path": "imgs/0.png", "label": 0})
    table = tmp_path / f"t.{fmt}"
    if fmt == "csv":
        import csv

        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), table)
    else:
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, bad = split_rows(open_dataset(table))
    assert [r.id for r in good] == ["k0", "k1", "k2"]
    assert [r.caption for r in good] == ["p 0", "p 1", "p 2"]
    assert good[2].image == tmp_path / "imgs" / "2.png"
    assert str(good[1].extra["label"]) == "1"
    assert [(b.id, b.reason) for b in bad] == [("k1", "duplicate_id")]


def test_bad_arguments_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="metadata.jsonl"):
        open_dataset(tmp_path)
    (tmp_path / "t.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no caption column"):
        open_dataset(tmp_path / "t.csv")
    with pytest.raises(ValueError, match="no column 'zzz'"):
        open_dataset(tmp_path / "t.csv", caption_column="zzz")
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported table format"):
        open_dataset(tmp_path / "t.txt")


def test_writer_round_trip_and_atomic_metadata(tmp_path):
    folder = tmp_path / "out"
    with ImageFolderWriter(folder) as w:
        w.add("a/b", "first <caption>", _rand_image(1), label=1)
        w.add("a_b", "second", _rand_image(2), label=0)  # same safe file name: gets a suffix
        assert not (folder / "metadata.jsonl").exists()  # not committed until closed
    good, bad = split_rows(open_dataset(folder))
    assert not bad
    assert [(r.id, r.caption, r.extra["label"]) for r in good] == [
        ("a/b", "first <caption>", 1),
        ("a_b", "second", 0),
    ]
    assert good[0].image != good[1].image
    assert np.array_equal(np.asarray(load_rgb(good[1].image)), _rand_image(2))

    with pytest.raises(RuntimeError):
        with ImageFolderWriter(tmp_path / "failed") as w:
            w.add("x", "y", _rand_image(3))
            raise RuntimeError("boom")
    assert not (tmp_path / "failed" / "metadata.jsonl").exists()
