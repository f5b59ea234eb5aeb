"""Readers of the public prompt sets, on files written here in each format; errors name the file and line."""

from __future__ import annotations

import json

import pytest

from diffmem.evaluate.suites import Suite, suite_from_rows
from diffmem.prompt_sets import read_prompt_set


def test_wen_jsonl(tmp_path):
    path = tmp_path / "sdv1_500_memorized.jsonl"
    path.write_text(
        "\n".join(json.dumps({"caption": c, "index": i, "url": "u"}) for i, c in enumerate(["a", "b"])) + "\n"
    )
    rows = read_prompt_set(path)
    assert [(r["prompt"], r["label"]) for r in rows] == [("a", 1), ("b", 1)]
    assert rows[0]["id"] == "sdv1_500_memorized.jsonl:0"
    path.write_text('{"caption": "a"}\n{not json}\n')
    with pytest.raises(ValueError, match="sdv1_500_memorized.jsonl line 2: not valid JSON"):
        read_prompt_set(path)


def test_membench_csv(tmp_path):
    path = tmp_path / "SD1_final.csv"
    path.write_text("index,prompt,urls\n0,a trigger prompt,\"['http://x']\"\n1,another,[]\n")
    rows = read_prompt_set(path)
    assert [r["prompt"] for r in rows] == ["a trigger prompt", "another"] and {r["label"] for r in rows} == {
        1
    }
    path.write_text("index,caption\n0,x\n")
    with pytest.raises(ValueError, match="SD1_final.csv: expected a CSV with a 'prompt' column"):
        read_prompt_set(path)


def test_membench_csv_as_written_trigger_prompts_with_their_source_images(tmp_path):
    """MemBench's file as its repository ships it: an unnamed index column, a Python list of source URLs
    (quoted when it holds several); every row a trigger prompt that keeps its sources into the suite."""
    path = tmp_path / "SD1_final.csv"
    path.write_text(
        ",prompt,urls\n"
        "0,fire us army garden flag single,['https://a.example/flag.jpg']\n"
        "7,\"rug, navy\",\"['https://b.example/1.jpg', 'https://c.example/2.jpg']\"\n",
        encoding="utf-8",
    )
    rows = read_prompt_set(path)
    assert [(r["id"], r["prompt"], r["role"], r["sources"]) for r in rows] == [
        ("SD1_final.csv:0", "fire us army garden flag single", "trigger", ["https://a.example/flag.jpg"]),
        ("SD1_final.csv:7", "rug, navy", "trigger", ["https://b.example/1.jpg", "https://c.example/2.jpg"]),
    ]
    suite = suite_from_rows("membench", rows)
    again = Suite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert again.splits["all"][1].sources == ("https://b.example/1.jpg", "https://c.example/2.jpg")
    assert again.to_dict() == suite.to_dict()
    path.write_text(",prompt,urls\n0,ok,['u']\n1,bad,__import__('os')\n")
    with pytest.raises(ValueError, match="SD1_final.csv row 3: 'urls' is not a list of URLs"):
        read_prompt_set(path)


def test_prompt_folder(tmp_path):
    (tmp_path / "sd1_mem.txt").write_text("memorized one\n\nmemorized two\n")
    (tmp_path / "sd1_nmem.txt").write_text("ordinary\n")
    (tmp_path / "group_nomem500.txt").write_text("another ordinary\n")
    rows = read_prompt_set(tmp_path)
    assert sorted((r["prompt"], r["label"]) for r in rows) == [
        ("another ordinary", 0),
        ("memorized one", 1),
        ("memorized two", 1),
        ("ordinary", 0),
    ]
    assert len({r["id"] for r in rows}) == 4


def test_webster_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "sd1.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c", "d"], "overfit_type": ["MV", "RV", "TV", "N"]}), path)
    rows = read_prompt_set(path)
    assert [(r["label"], r["role"]) for r in rows] == [(1, "MV"), (1, "RV"), (1, "TV"), (0, "N")]
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "overfit_type": ["none", None, ""]}), path)
    assert [r["label"] for r in read_prompt_set(path)] == [0, 0, 0]


@pytest.mark.parametrize("value", ["maybe", "yes", "1", "memorized"])
def test_webster_parquet_refuses_unknown_labels_naming_the_row(tmp_path, value):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "sd1.parquet"
    pq.write_table(pa.table({"caption": ["a", "b", "c"], "overfit_type": ["MV", "N", value]}), path)
    with pytest.raises(ValueError) as info:
        read_prompt_set(path)
    assert str(info.value) == (
        f"{path} row 2: overfit_type {value!r} is not a Webster label; expected one of MV, RV, TV (memorized) "
        "or N, NONE or empty (not)"
    )


def test_negatives_and_bad_input(tmp_path):
    path = tmp_path / "negatives.txt"
    path.write_text("a cat\na dog\n")
    assert [r["label"] for r in read_prompt_set(path)] == [0, 0]
    path.write_bytes(b"a cat\n\xff\xfe bad\n")
    with pytest.raises(ValueError, match=r"negatives.txt line 2 is not UTF-8 \(byte 0xff\)"):
        read_prompt_set(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl does not exist"):
        read_prompt_set(tmp_path / "missing.jsonl")
    (tmp_path / "x.bin").write_text("?")
    with pytest.raises(ValueError, match="cannot tell the prompt set's format"):
        read_prompt_set(tmp_path / "x.bin")
