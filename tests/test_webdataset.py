"""diffmem.shards: img2dataset outputs (webdataset tar shards, parquet with image bytes) as training sets."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffmem.data import check_record, load_rgb, open_dataset, split_rows
from diffmem.records import REASONS, BadImageError, BadRow, Record
from diffmem.shards import (
    is_member_ref,
    member_ref,
    parse_member_ref,
    read_member_bytes,
)


def _pixels(seed: int, size: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _meta(key: str, caption: str | None, **extra) -> dict:
    """The json img2dataset writes beside each image."""
    return {
        "url": f"https://example.com/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": 12,
        "height": 12,
        "original_width": 48,
        "original_height": 48,
        "exif": None,
        "sha256": "0" * 64,
        "caption": caption,
        **extra,
    }


def _sample(key: str, image: bytes | None, caption: str | None, ext: str = "jpg", txt=True, **extra):
    """The members of one img2dataset webdataset sample: {key}.{ext}, {key}.json, {key}.txt."""
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    members.append((f"{key}.json", json.dumps(_meta(key, caption, **extra)).encode()))
    if txt:
        members.append((f"{key}.txt", (caption or "").encode()))
    return members


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            info.mode = 0o444
            tf.addfile(info, io.BytesIO(data))
    return path


def _img2dataset_folder(folder: Path, shards: list[list[tuple[str, bytes]]]) -> Path:
    """Tar shards 00000.tar, ... with the metadata-only parquet and stats files img2dataset writes beside."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, members in enumerate(shards):
        _write_tar(folder / f"{k:05d}.tar", members)
        metas = [json.loads(data) for name, data in members if name.endswith(".json")]
        pq.write_table(pa.Table.from_pylist(metas), folder / f"{k:05d}.parquet")
        (folder / f"{k:05d}_stats.json").write_text(
            json.dumps({"count": len(metas), "successes": len(metas)})
        )
    return folder


@pytest.fixture()
def good_shards(tmp_path):
    """Two shards of five samples: PNG and JPEG images, one caption only in the json, a memorized column."""
    arrays = {f"00000000{i}": _pixels(i) for i in range(5)}
    keys = list(arrays)
    shard0 = (
        _sample(keys[0], _encode(arrays[keys[0]], "PNG"), "a red fox", ext="png", memorized=True)
        + _sample(keys[1], _encode(arrays[keys[1]], "JPEG"), "a blue car", memorized=False)
        + _sample(
            keys[2], _encode(arrays[keys[2]], "PNG"), "json only", ext="png", txt=False, memorized=False
        )
    )
    shard1 = _sample(keys[3], _encode(arrays[keys[3]], "JPEG"), "a green hill", memorized=True) + _sample(
        keys[4], _encode(arrays[keys[4]], "WEBP"), "a grey cat", ext="webp", memorized=False
    )
    folder = _img2dataset_folder(tmp_path / "wds", [shard0, shard1])
    return folder, arrays


def test_webdataset_folder_records_captions_and_extra(good_shards):
    folder, arrays = good_shards
    records, bad = split_rows(open_dataset(folder))
    assert bad == []
    assert [r.id for r in records] == list(arrays)
    assert [r.row for r in records] == [0, 1, 2, 3, 4]
    assert [r.caption for r in records] == [
        "a red fox",
        "a blue car",
        "json only",
        "a green hill",
        "a grey cat",
    ]
    assert [r.extra["memorized"] for r in records] == [True, False, False, True, False]
    first = records[0].extra
    assert first["url"] == "https://example.com/000000000.jpg" and first["width"] == 12
    assert first["status"] == "success" and "key" not in first and "caption" not in first
    for r in records:
        ref = str(r.image)
        assert is_member_ref(ref) and str(Path(ref)) == ref
        assert parse_member_ref(ref).container == folder.absolute() / f"{r.row // 3:05d}.tar"


def test_single_tar_and_relative_path(good_shards, monkeypatch):
    folder, arrays = good_shards
    monkeypatch.chdir(folder)
    records, bad = split_rows(open_dataset("00001.tar"))
    assert bad == [] and [r.id for r in records] == list(arrays)[3:]
    assert [r.row for r in records] == [0, 1]
    ref = str(records[0].image)
    assert ref.startswith(str(folder.absolute() / "00001.tar") + "::")  # absolute, so usable from anywhere
    monkeypatch.chdir("/")
    assert np.array_equal(np.asarray(load_rgb(ref)), np.asarray(load_rgb(Path(ref))))


def test_member_reference_pixels(good_shards, tmp_path):
    folder, arrays = good_shards
    records, _ = split_rows(open_dataset(folder))
    by_id = {r.id: r for r in records}
    png = by_id["000000000"]
    assert np.array_equal(np.asarray(load_rgb(png.image)), arrays["000000000"])  # lossless: exact
    jpeg = by_id["000000001"]
    jpeg_file = tmp_path / "same.jpg"
    jpeg_file.write_bytes(_encode(arrays["000000001"], "JPEG"))
    assert read_member_bytes(str(jpeg.image)) == jpeg_file.read_bytes()
    assert np.array_equal(np.asarray(load_rgb(str(jpeg.image))), np.asarray(load_rgb(jpeg_file)))
    # the scan catalog's round trip: str -> Path -> check_record
    for r in records:
        image, badrow = check_record(Record(r.id, "-", Path(str(r.image)), r.row))
        assert badrow is None and image.size == (12, 12) and image.mode == "RGB"


def test_reading_a_member_does_not_read_the_rest_of_the_tar(good_shards, tmp_path):
    folder, arrays = good_shards
    records, _ = split_rows(open_dataset(folder / "00000.tar"))
    ref = parse_member_ref(records[0].image)
    blob = bytearray((folder / "00000.tar").read_bytes())
    keep = blob[ref.offset : ref.offset + ref.size]
    blob[:] = np.random.default_rng(0).integers(0, 256, len(blob), dtype=np.uint8).tobytes()
    blob[ref.offset : ref.offset + ref.size] = keep  # every header and every other member is now garbage
    garbled = tmp_path / "garbled.tar"
    garbled.write_bytes(bytes(blob))
    with pytest.raises(tarfile.ReadError):
        tarfile.open(garbled).getmembers()
    moved = member_ref(garbled, offset=ref.offset, size=ref.size)
    assert np.array_equal(np.asarray(load_rgb(moved)), arrays["000000000"])


def test_member_reference_errors(good_shards, tmp_path):
    folder, _ = good_shards
    records, _ = split_rows(open_dataset(folder / "00000.tar"))
    ref = parse_member_ref(records[0].image)
    copy = shutil.copy(folder / "00000.tar", tmp_path / "copy.tar")
    with pytest.raises(BadImageError) as err:
        load_rgb(member_ref(tmp_path / "gone.tar", offset=ref.offset, size=ref.size))
    assert err.value.reason == "missing_file"
    with pytest.raises(BadImageError) as err:  # the json member's bytes are no image
        load_rgb(member_ref(copy, offset=ref.offset + 1024, size=100))
    assert err.value.reason == "corrupt_image"
    with open(copy, "r+b") as f:
        f.truncate(ref.offset + ref.size // 2)
    with pytest.raises(BadImageError) as err:
        load_rgb(member_ref(copy, offset=ref.offset, size=ref.size))
    assert err.value.reason == "truncated_image"
    _, badrow = check_record(Record("x", "-", Path(member_ref(tmp_path / "gone.tar", offset=0, size=1)), 0))
    assert badrow.reason == "missing_file"


def test_reference_format():
    ref = member_ref("/data/laion/00003.tar", offset=4608, size=1234)
    assert ref == "/data/laion/00003.tar::4608+1234" and str(Path(ref)) == ref
    pref = member_ref("/data/part.parquet", row=17, column="jpg")
    assert pref == "/data/part.parquet::row=17,col=jpg" and str(Path(pref)) == pref
    odd = member_ref("/data/part.parquet", row=0, column="img/bytes")
    assert str(Path(odd)) == odd and parse_member_ref(odd).column == "img/bytes"
    assert parse_member_ref("/a::b/c.tar::1+2").container == Path("/a::b/c.tar")
    assert not is_member_ref("/data/images/cat.jpg") and not is_member_ref("/data/x.tar")


def test_bad_samples_get_their_reasons(tmp_path):
    png = _encode(_pixels(1), "PNG")
    members = (
        _sample("000000000", png, "fine", ext="png")
        + _sample("000000001", None, "no image")
        + _sample("000000002", png, "   ", ext="png")
        + _sample("000000000", png, "same key again", ext="png")
        + [
            ("000000003.png", png),
            ("000000003.json", b'{"key": "000000003", "caption": '),
            ("000000003.txt", b"x"),
        ]
        + [("000000004.png", png), ("000000004.json", b'{"key": "\xff\xfe"}'), ("000000004.txt", b"y")]
        + [("000000005.png", png), ("000000005.txt", b"caption, no json")]
        + [("000000006.png", png), ("000000006.json", b"[1, 2]")]
    )
    items = list(open_dataset(_write_tar(tmp_path / "bad.tar", members)))
    got = [(it.row, it.reason if isinstance(it, BadRow) else "ok") for it in items]
    assert got == [
        (0, "ok"),
        (1, "missing_image_path"),
        (2, "empty_caption"),
        (3, "duplicate_id"),
        (4, "malformed_row"),
        (5, "malformed_row"),
        (6, "ok"),
        (7, "malformed_row"),
    ]
    assert all(it.reason in REASONS for it in items if isinstance(it, BadRow))
    assert "not valid JSON" in items[4].detail and "not UTF-8" in items[5].detail
    assert items[6].id == "000000005" and items[6].caption == "caption, no json"  # id from the member key
    assert items[1].source == str((tmp_path / "bad.tar").absolute())
    # without require_image the sample without an image is kept, caption-only
    kept = list(open_dataset(tmp_path / "bad.tar", require_image=False))[1]
    assert isinstance(kept, Record) and kept.image is None


@pytest.mark.parametrize("cut", ["mid_data", "mid_header", "at_header", "no_end_marker", "garbage_header"])
def test_truncated_shard_then_good_shard(tmp_path, cut):
    png = _encode(_pixels(2, 32), "PNG")
    shard0 = [m for i in range(3) for m in _sample(f"00000000{i}", png, f"caption {i}", ext="png")]
    shard1 = [m for i in range(3, 5) for m in _sample(f"00000000{i}", png, f"caption {i}", ext="png")]
    folder = _img2dataset_folder(tmp_path / "wds", [shard0, shard1])
    tar0 = folder / "00000.tar"
    with tarfile.open(tar0) as tf:
        third = next(m for m in tf.getmembers() if m.name == "000000002.png")
        end = max(m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers())
    blob = tar0.read_bytes()
    if cut == "mid_data":
        blob = blob[: third.offset_data + 100]
    elif cut == "mid_header":
        blob = blob[: third.offset + 200]
    elif cut == "at_header":
        blob = blob[: third.offset]
    elif cut == "no_end_marker":  # every member complete, the end-of-archive blocks missing
        blob = blob[:end]
    else:
        blob = blob[: third.offset] + b"\x07" * 512 + blob[third.offset + 512 :]
    tar0.write_bytes(blob)
    items = list(open_dataset(folder))
    # the sample being read at the defect is dropped: it may lack members; the ones before it are kept
    complete = 2 if cut in ("mid_data", "no_end_marker") else 1
    kinds = [it.reason if isinstance(it, BadRow) else it.id for it in items]
    kept = [f"00000000{i}" for i in range(complete)]
    assert kinds == [*kept, "malformed_row", "000000003", "000000004"]
    assert [it.row for it in items] == list(range(complete + 3))
    bad = items[complete]
    assert str(tar0.absolute()) in bad.detail and f"after {complete} complete samples" in bad.detail
    assert f"00000000{complete}" in bad.detail and bad.source == str(tar0.absolute())
    assert all(isinstance(load_rgb(it.image), Image.Image) for it in items if isinstance(it, Record))


def test_not_a_tar_at_all(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(b"this is not a tar archive" * 40)
    _write_tar(folder / "00001.tar", _sample("000010000", _encode(_pixels(3), "PNG"), "ok", ext="png"))
    (folder / "00002.tar").write_bytes(b"")
    items = list(open_dataset(folder))
    assert [it.reason if isinstance(it, BadRow) else "ok" for it in items] == [
        "malformed_row",
        "ok",
        "malformed_row",
    ]


def test_column_options_for_tar(tmp_path):
    png, jpg = _encode(_pixels(4), "PNG"), _encode(_pixels(5), "JPEG")
    members = [
        ("a.jpg", jpg),
        ("a.png", png),
        (
            "a.json",
            json.dumps({"key": "k-a", "caption": "from json", "alt": "alt text", "uid": "u1"}).encode(),
        ),
        ("a.txt", b"from txt"),
    ]
    tar = _write_tar(tmp_path / "one.tar", members)
    (default,) = list(open_dataset(tar))
    assert (default.id, default.caption) == ("k-a", "from txt")
    assert read_member_bytes(str(default.image)) == jpg  # jpg preferred
    (chosen,) = list(open_dataset(tar, image_column="png", caption_column="alt", id_column="uid"))
    assert (chosen.id, chosen.caption) == ("u1", "alt text")
    assert read_member_bytes(str(chosen.image)) == png
    assert "alt" not in chosen.extra and "uid" not in chosen.extra
    (from_json,) = list(open_dataset(tar, caption_column="caption"))
    assert from_json.caption == "from json"
    (no_webp,) = list(open_dataset(tar, image_column="webp"))
    assert no_webp.reason == "missing_image_path"
    (no_field,) = list(open_dataset(tar, id_column="nope"))
    assert no_field.reason == "missing_id"


def _parquet_rows(start: int, n: int, fmt: str = "PNG") -> tuple[list[dict], dict[str, np.ndarray]]:
    rows, arrays = [], {}
    for i in range(start, start + n):
        key = f"{i:09d}"
        arrays[key] = _pixels(i)
        meta = _meta(key, f"caption {i}", memorized=i % 2 == 0)
        rows.append({**meta, "jpg": _encode(arrays[key], fmt)})
    return rows, arrays


def test_parquet_with_image_bytes(tmp_path):
    rows, arrays = _parquet_rows(0, 7)
    rows[2]["jpg"] = None  # no image
    rows[4]["caption"] = ""  # empty caption
    rows[5]["key"] = rows[0]["key"]  # duplicate key
    table = pa.Table.from_pylist(rows)
    assert pa.types.is_binary(table.schema.field("jpg").type)
    path = tmp_path / "part.parquet"
    pq.write_table(table, path, row_group_size=2)  # several row groups
    items = list(open_dataset(path))
    got = [it.reason if isinstance(it, BadRow) else it.id for it in items]
    assert got == ["000000000", "000000001", "missing_image_path", "000000003", "empty_caption"] + [
        "duplicate_id",
        "000000006",
    ]
    records = [it for it in items if isinstance(it, Record)]
    assert records[-1].caption == "caption 6" and records[-1].extra["memorized"] is True
    assert "jpg" not in records[0].extra and records[0].extra["url"].startswith("https://")
    # out of order, so that row groups are read and re-read
    for r in reversed(records + records):
        ref = str(r.image)
        assert str(Path(ref)) == ref and ref == f"{path.absolute()}::row={r.row},col=jpg"
        assert np.array_equal(np.asarray(load_rgb(ref)), arrays[r.id])
    with pytest.raises(BadImageError) as err:
        load_rgb(member_ref(path, row=2, column="jpg"))
    assert err.value.reason == "missing_file"
    with pytest.raises(BadImageError) as err:
        load_rgb(member_ref(path, row=99, column="jpg"))
    assert err.value.reason == "missing_file"
    with pytest.raises(BadImageError) as err:
        load_rgb(member_ref(tmp_path / "gone.parquet", row=0, column="jpg"))
    assert err.value.reason == "missing_file"


def test_parquet_shard_folder_and_bad_bytes(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    rows0, arrays0 = _parquet_rows(0, 3, fmt="JPEG")
    rows1, arrays1 = _parquet_rows(3, 2)
    rows1[1]["jpg"] = b"not an image"
    pq.write_table(pa.Table.from_pylist(rows0), folder / "00000.parquet")
    pq.write_table(pa.Table.from_pylist(rows1), folder / "00001.parquet")
    (folder / "00000_stats.json").write_text("{}")
    records, bad = split_rows(open_dataset(folder))
    assert bad == [] and [r.row for r in records] == [0, 1, 2, 3, 4]
    assert parse_member_ref(records[3].image).row == 0  # the row inside its own file
    jpeg_file = tmp_path / "x.jpg"
    jpeg_file.write_bytes(rows0[1]["jpg"])
    assert np.array_equal(np.asarray(load_rgb(records[1].image)), np.asarray(load_rgb(jpeg_file)))
    assert np.array_equal(np.asarray(load_rgb(records[3].image)), arrays1["000000003"])
    _, badrow = check_record(records[4])
    assert badrow.reason == "corrupt_image"


def test_parquet_of_image_paths_is_still_a_table(tmp_path):
    Image.fromarray(_pixels(7)).save(tmp_path / "a.png")
    pq.write_table(
        pa.Table.from_pylist([{"id": "a", "caption": "c", "image": "a.png"}]), tmp_path / "t.parquet"
    )
    (record,) = list(open_dataset(tmp_path / "t.parquet"))
    assert record.image == tmp_path / "a.png" and not is_member_ref(record.image)
