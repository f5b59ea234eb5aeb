"""Readers for the field's public memorized-prompt sets (the data stays with the user).

Each reader returns rows ``{"id", "prompt", "label", "role"}`` (label 1 = memorized) that
:func:`diffmem.evaluate.suites.suite_from_rows` turns into a harness split:

* Webster / Wen et al.'s 500 SD-1 prompts, JSONL with ``caption``, ``index``, ``url``
  (``sdv1_500_memorized.jsonl``): all memorized;
* MemBench (TMLR 2025), CSV with an index column, ``prompt`` and ``urls`` (the source images' URLs): all
  memorized (trigger prompts), each row with its ``sources``;
* prompt-list folders as in the SAIL and MemAttn repositories: ``*_mem*.txt`` (memorized) and
  ``*_nmem*.txt`` / ``*nomem*.txt`` (not), one prompt per line;
* Webster's one-step extraction parquet with ``caption`` and ``overfit_type`` in {MV, RV, TV} (matching,
  retrieval and template verbatim; memorized) or N / none (not);
* a plain negatives file (``.txt``, one prompt per line): all label 0.

:func:`read_prompt_file` reads the prompt files of the commands (``--prompts``, ``--memorized``, ...): a
.txt file, a .jsonl/.csv file with chosen columns, or any caption table. Every error names the file and
the line or row.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
from pathlib import Path

from diffmem.data import open_dataset, split_rows
from diffmem.io import read_text
from diffmem.records import CAPTION_COLUMNS

__all__ = ["KINDS", "read_prompt_set"]

KINDS = ("auto", "wen-jsonl", "membench-csv", "prompt-folder", "webster-parquet", "negatives")
MEMORIZED_TYPES = {"MV", "RV", "TV"}
#: Webster's label of a prompt that is not memorized (compared upper-cased; a null cell is one too)
CLEAN_TYPES = {"N", "NONE"}


def _text(path: Path) -> str:

    return read_text(path, "prompt set")


def _lines(path: Path, label: int, role: str) -> list[dict]:
    rows = []
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if line.strip():
            rows.append({"id": f"{path.stem}:{n}", "prompt": line.strip(), "label": label, "role": role})
    if not rows:
        raise ValueError(f"{path}: no prompts (expected one prompt per line)")
    return rows


def _wen_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n}: not valid JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("caption"), str) or not obj["caption"].strip():
            raise ValueError(
                f'{path} line {n}: expected an object with a non-empty "caption" (Wen et al.\'s format)'
            )
        rows.append(
            {
                "id": str(obj.get("index", n - 1)),
                "prompt": obj["caption"].strip(),
                "label": 1,
                "role": "memorized",
            }
        )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _url_list(cell: str | None, path: Path, n: int) -> list[str]:
    """MemBench's ``urls`` cell, a Python list literal of the source images' URLs (``[]`` when empty)."""
    if cell is None or not cell.strip():
        return []
    try:
        urls = ast.literal_eval(cell.strip())  # literals only: no code runs
    except (ValueError, SyntaxError):
        urls = None
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ValueError(
            f"{path} row {n}: 'urls' is not a list of URLs (MemBench writes a list such as ['https://...'])"
        )
    return urls


def _membench_csv(path: Path) -> list[dict]:
    """MemBench's ``SD1_final.csv``: an unnamed (or ``index``) first column, ``prompt``, and ``urls``, the
    source images a trigger prompt reproduces; every row a trigger prompt (label 1) with its sources."""
    reader = csv.DictReader(io.StringIO(_text(path)))
    if reader.fieldnames is None or "prompt" not in reader.fieldnames:
        raise ValueError(
            f"{path}: expected a CSV with a 'prompt' column (MemBench's format), got {reader.fieldnames}"
        )
    rows = []
    for n, row in enumerate(reader, start=2):
        prompt = (row.get("prompt") or "").strip()
        if not prompt:
            raise ValueError(f"{path} row {n}: empty prompt")
        index = (row.get("index") or row.get("") or "").strip() or str(n - 2)
        rows.append(
            {
                "id": index,
                "prompt": prompt,
                "label": 1,
                "role": "trigger",
                "sources": _url_list(row.get("urls"), path, n),
            }
        )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _folder(path: Path) -> list[dict]:
    rows = []
    for file in sorted(path.glob("*.txt")):
        stem = file.stem.lower()
        if "nmem" in stem or "nomem" in stem or "non_mem" in stem:
            rows += _lines(file, 0, "not memorized")
        elif "mem" in stem:
            rows += _lines(file, 1, "memorized")
    if not rows:
        raise ValueError(f"{path}: no *_mem*.txt or *_nmem*.txt prompt lists in this folder")
    return rows


def _webster_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install diffmem[scan])") from None
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several error types for a broken file
        raise ValueError(f"{path}: not a readable parquet file ({err})") from None
    columns = set(table.column_names)
    caption = "caption" if "caption" in columns else "prompt" if "prompt" in columns else None
    if caption is None or "overfit_type" not in columns:
        raise ValueError(
            f"{path}: expected columns 'caption' and 'overfit_type' (Webster's format), got {sorted(columns)}"
        )
    rows = []
    for n, (text, kind) in enumerate(
        zip(table.column(caption).to_pylist(), table.column("overfit_type").to_pylist())
    ):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path} row {n}: empty caption")
        kind = "N" if kind is None or not str(kind).strip() else str(kind).strip().upper()
        if kind not in MEMORIZED_TYPES | CLEAN_TYPES:
            raise ValueError(
                f"{path} row {n}: overfit_type {table.column('overfit_type')[n].as_py()!r} is not a Webster "
                f"label; expected one of {', '.join(sorted(MEMORIZED_TYPES))} (memorized) or "
                f"{', '.join(sorted(CLEAN_TYPES))} or empty (not)"
            )
        rows.append(
            {"id": str(n), "prompt": text.strip(), "label": int(kind in MEMORIZED_TYPES), "role": kind}
        )
    return rows


def detect_kind(path: Path) -> str:
    if path.is_dir():
        return "prompt-folder"
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return "wen-jsonl"
    if suffix == ".csv":
        return "membench-csv"
    if suffix == ".parquet":
        return "webster-parquet"
    if suffix == ".txt":
        return "negatives"
    raise ValueError(
        f"{path}: cannot tell the prompt set's format from its name (pass a kind: {', '.join(KINDS[1:])})"
    )


def read_prompt_set(path: str | os.PathLike, kind: str = "auto") -> list[dict]:
    """Rows ``{"id", "prompt", "label", "role"}`` of a public prompt-set file (see the module docstring)."""
    path = Path(path)
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (expected a prompt set: {', '.join(KINDS[1:])})")
    kind = detect_kind(path) if kind == "auto" else kind
    readers = {
        "wen-jsonl": _wen_jsonl,
        "membench-csv": _membench_csv,
        "prompt-folder": _folder,
        "webster-parquet": _webster_parquet,
        "negatives": lambda p: _lines(p, 0, "negative"),
    }
    rows = readers[kind](path)
    for r in rows:  # ids unique across files: prefix with the file name
        r["id"] = f"{path.name}:{r['id']}" if kind != "prompt-folder" else r["id"]
    return rows


# ---------------------------------------------------------------------------- prompt files of the CLI


_TRUE = {"1", "true", "yes", "memorized", "mem", "vm", "tm"}
_FALSE = {"0", "false", "no", "not_memorized", "non_memorized", "clean"}


def _parse_label(value, where: str) -> int:
    text = str(value).strip().lower()
    if text in _TRUE:
        return 1
    if text in _FALSE:
        return 0
    raise ValueError(f"{where}: label {value!r} is not a 0/1 (or true/false) value")


def read_prompt_file(
    path: str | os.PathLike,
    caption_column: str | None = "caption",
    id_column: str | None = None,
    label_column: str | None = None,
    argument: str = "--prompts",
) -> list[dict]:
    """Rows ``{"id", "prompt"[, "label"]}`` of a prompt file: a .txt file (one prompt per non-empty line), a
    .jsonl or .csv file (``caption_column``, ``id_column``, ``label_column``; ``caption_column=None`` takes
    the first of ``caption``, ``text``, ``prompt``), or any caption table ``diffmem.data`` reads (.parquet,
    an image folder's metadata). Every error is one line that names ``argument``, the file and the row."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{argument}: {path} does not exist (expected a .txt file of prompts or a caption table)"
        )
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl", ".csv"):
        return _caption_table(path, argument)
    text = read_text(path, argument)
    if suffix == ".txt":
        if id_column or label_column:
            raise ValueError(
                f"{argument}: a .txt file has no columns; use .jsonl or .csv for --id-column/--labels"
            )
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        rows = [{"id": str(i), "prompt": p} for i, p in enumerate(prompts)]
        if not rows:
            raise ValueError(f"{argument}: {path} has no prompts")
        return rows
    if suffix == ".jsonl":
        raw = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{argument}: {path} line {n} is not valid JSON ({err})") from err
            if not isinstance(obj, dict):
                raise ValueError(f"{argument}: {path} line {n} is not a JSON object")
            raw.append((f"{path} line {n}", obj))
    else:
        reader = csv.DictReader(io.StringIO(text))
        raw = [(f"{path} row {n}", row) for n, row in enumerate(reader, start=2)]
    if not raw:
        raise ValueError(f"{argument}: {path} has no rows")
    if caption_column is None:
        caption_column = next((c for c in CAPTION_COLUMNS if c in raw[0][1]), CAPTION_COLUMNS[0])
    rows, seen = [], set()
    for i, (where, obj) in enumerate(raw):
        for column, flag in (
            (caption_column, "--caption-column"),
            (id_column, "--id-column"),
            (label_column, "--labels"),
        ):
            if column is not None and column not in obj:
                raise ValueError(f"{where}: no column {column!r} ({flag}); columns are {sorted(obj)}")
        prompt = obj[caption_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: empty caption in column {caption_column!r}")
        row = {"id": str(obj[id_column]) if id_column else str(i), "prompt": prompt.strip()}
        if row["id"] in seen:
            raise ValueError(f"{where}: duplicate id {row['id']!r} in column {id_column!r}")
        seen.add(row["id"])
        if label_column is not None:
            row["label"] = _parse_label(obj[label_column], where)
        rows.append(row)
    return rows


def _caption_table(path: Path, argument: str) -> list[dict]:
    """Rows of any other caption table :func:`diffmem.data.open_dataset` reads (its ids and captions)."""
    try:
        records, bad = split_rows(open_dataset(path, require_image=False, check_files=False))
    except (ValueError, OSError) as err:  # pyarrow's own errors (not parquet, damaged): ValueError / OSError
        if not type(err).__module__.startswith("pyarrow"):
            raise
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{argument}: {path} is not a caption table diffmem can read ({detail}); "
            "expected .txt, .jsonl or .csv prompts, or a .parquet caption table"
        ) from None
    if bad:
        b = bad[0]
        raise ValueError(f"{argument}: {path} row {b.row}: {b.reason} ({b.detail})")
    if not records:
        raise ValueError(f"{argument}: {path} has no prompts")
    return [{"id": r.id, "prompt": r.caption} for r in records]
