"""Bad input, measured: many bad invocations of every command, each classified by what came back.

Each case runs ``diffmem.cli.main`` in this process on inputs this script makes (broken copies of a tiny
model folder, Latin-1 files, pickles, bad numbers, broken embedding layouts and indexes, mislabelled
prompt sets, foreign files, output paths of the wrong kind) and counts, per class of bad input:

* clear error: exit code 2 and exactly one stderr line ``diffmem <command>: error: ...`` that names
  what the case expects it to name (the argument, file or component), with no exception class name in it;
* traceback: an exception escaped ``main`` (or a "Traceback" was printed);
* accepted: exit code 0 (a bad value ran);
* rows lost: for the dataset cases, rows that are neither read nor reported bad.

    .venv/bin/python benchmarks/bad_input_sweep.py            # prints the Markdown table
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import torch

from diffmem.cli import main as cli
from diffmem.data import open_dataset, split_rows
from diffmem.embed import load_embedder
from diffmem.scan.layout import write_vectors
from diffmem.tiny import TinySDConfig, build_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


class _Evil:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def _cases(work: Path):
    """(class, argv, words expected in the error line)."""
    from safetensors.torch import load_file

    good = work / "good"
    build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0).save_pretrained(good)
    prompts = work / "p.txt"
    prompts.write_text("a photo of a cat\na red car\n", encoding="utf-8")
    p = str(prompts)

    def broken(name, change):
        folder = shutil.copytree(good, work / name)
        change(folder)
        return str(folder)

    def only_bin(f):
        state = load_file(f / "unet" / "diffusion_pytorch_model.safetensors")
        (f / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        torch.save(state, f / "unet" / "diffusion_pytorch_model.bin")

    def truncate(f):
        w = f / "unet" / "diffusion_pytorch_model.safetensors"
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])

    folders = {
        "no-weights": (
            broken("nw", lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink()),
            "no weights file",
        ),
        "only-bin": (broken("bin", only_bin), "only pickle weights"),
        "config-not-json": (
            broken("cfg", lambda f: (f / "unet" / "config.json").write_text("{oops")),
            "not valid JSON",
        ),
        "truncated": (broken("tr", truncate), "truncated"),
        "empty-tokenizer": (
            broken("tok", lambda f: [x.unlink() for x in (f / "tokenizer").iterdir()]),
            "tokenizer",
        ),
        "missing-component": (broken("vae", lambda f: shutil.rmtree(f / "vae")), "lacks the component"),
        "index-not-json": (
            broken("idx", lambda f: (f / "model_index.json").write_text("{")),
            "not valid JSON",
        ),
        "not-a-folder": (str(prompts), "is a file"),
        "missing": (str(work / "nothing"), "does not exist"),
        "hub-id-offline": ("nobody/nothing", "not a folder here"),
    }
    out = str(work / "out")
    for model, words in folders.values():
        yield "model folder", ["detect", "--model", model, "--prompts", p, "--out", out + ".jsonl"], words
        yield (
            "model folder",
            ["localize", "--model", model, "--prompts", p, "--reference-prompts", p, "--out", out],
            words,
        )
    yield (
        "model folder",
        ["prune", "--model", folders["truncated"][0], "--memorized", p, "--out", out + ".st"],
        "truncated",
    )
    yield "model folder", ["scan", "--model", folders["only-bin"][0], "--data", p, "--out", out], ""
    device = "--device: cuda" if not torch.cuda.is_available() else "--device"
    localize = ["localize", "--model", str(good), "--prompts", p, "--reference-prompts", p, "--out", out]
    yield "device", [*localize, "--device", "cuda"], device
    yield "device", [*localize, "--device", "gpu9"], "--device"

    numbers = [
        ["demo", "--threshold", "nan"],
        ["demo", "--threshold", "-1"],
        ["demo", "--steps", "0"],
        ["demo", "--steps", "-3"],
        ["demo", "--seeds", "0"],
        ["localize", "--prompts", p, "--out", out, "--threshold", "nan"],
        ["localize", "--prompts", p, "--out", out, "--threshold", "-1"],
        ["localize", "--prompts", p, "--out", out, "--steps", "1", "--reference-prompts", p],
        ["attack", "--targets", p, "--out", out, "--threshold", "nan"],
        ["attack", "--targets", p, "--out", out, "--threshold", "-1"],
        ["attack", "--targets", p, "--out", out, "--lr", "0"],
        ["detect", "--prompts", p, "--out", out, "--num-gens", "0"],
        ["detect", "--prompts", p, "--out", out, "--steps", "30"],
        ["detect", "--prompts", p, "--out", out, "--guidance-scale", "inf"],
        ["scan", "--data", p, "--out", out, "--num-gens", "x"],
        ["bench", "detection", "--threshold", "-2"],
        ["prune", "--memorized", p, "--out", out, "--ratio", "nan"],
        ["finetune", "--targets", p, "--retain", p, "--out", out, "--rounds", "0"],
    ]
    for argv in numbers:
        yield "number", argv, "--"

    latin = work / "latin1.txt"
    latin.write_bytes("a cat\nune tête\n".encode("latin-1"))
    bad_csv = work / "bad.csv"
    bad_csv.write_bytes(b"id,caption\n0,ok\n1,caf\xe9\n")
    for argv, words in (
        (["detect", "--prompts", str(latin), "--out", out + ".jsonl"], "line 2 is not UTF-8"),
        (
            ["localize", "--prompts", str(latin), "--out", out, "--reference-prompts", p],
            "line 2 is not UTF-8",
        ),
        (
            ["localize", "--prompts", p, "--out", out, "--reference-prompts", str(latin)],
            "--reference-prompts",
        ),
        (["prune", "--memorized", str(latin), "--out", out + ".st"], "--memorized"),
        (["prune", "--memorized", str(bad_csv), "--out", out + ".st"], "not UTF-8"),
        (["attack", "--targets", str(work / "missing"), "--out", out], "--targets"),
        (
            ["finetune", "--adversarial", "--targets", str(work / "missing"), "--retain", p, "--out", out],
            "--targets",
        ),
        (["detect", "--prompts", str(work / "none.txt"), "--out", out + ".jsonl"], "none.txt"),
    ):
        yield "text file", argv, words

    evil = work / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    saved = work / "saved.pt"
    torch.save({"w": torch.zeros(1)}, saved)
    scan = ["scan", "--data", p, "--out", out, "--embedder"]
    for argv, words in (
        (["attack", "--targets", p, "--out", out, "--neurons", str(evil)], "--neurons"),
        (["attack", "--targets", p, "--out", out, "--mask", str(evil)], "--mask"),
        ([*scan, "sscd", "--embedder-file", str(evil), "--allow-torchscript"], "not a TorchScript"),
        ([*scan, "sscd", "--embedder-file", str(saved), "--allow-torchscript"], "not a TorchScript"),
        ([*scan, "clip", "--embedder-arch", "ViT-B-32", "--embedder-file", str(evil)], "--embedder-file"),
    ):
        yield "pickle offered", argv, words
    yield from _newer_cases(work, good, prompts)


def _newer_cases(work: Path, good: Path, prompts: Path):
    """The newer commands (issue #36): embed, index, scan against a prebuilt layout or index, bench suites,
    memcontrol; broken layouts, foreign files and ``--out`` paths of the wrong kind."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    data = work / "imgs"
    data.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (90 * i, 0, 0)).save(data / f"{i}.png")
    rows = "".join(f'{{"file_name": "{i}.png", "text": "c{i}", "memorized": true}}\n' for i in range(2))
    (data / "metadata.jsonl").write_text(rows)
    a_file = work / "a_file"
    a_file.write_text("x")
    describe = load_embedder("pixel", pixel_size=4).describe()
    rng = np.random.default_rng(0)

    def layout(name, change=None):
        x = rng.standard_normal((7, describe["dim"])).astype("float32")
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        root = work / name
        write_vectors(root, [x[:4], x[4:]], describe)
        if change is not None:
            change(root)
        return str(root)

    def npy(root, k):
        return root / "img_emb" / f"img_emb_{k:04d}.npy"

    breakages = {
        "short-npy": (lambda r: np.save(npy(r, 0), np.load(npy(r, 0))[:3]), "holds 3 vectors but"),
        "truncated-npy": (lambda r: npy(r, 1).write_bytes(npy(r, 1).read_bytes()[:-10]), "is truncated"),
        "empty-npy": (lambda r: npy(r, 0).write_bytes(b""), "is not a NumPy .npy array"),
        "missing-parquet": (lambda r: (r / "metadata" / "metadata_0001.parquet").unlink(), "is missing"),
        "not-parquet": (
            lambda r: (r / "metadata" / "metadata_0000.parquet").write_bytes(b"junk"),
            "is not a parquet file",
        ),
        "no-columns": (
            lambda r: pq.write_table(pa.table({"x": [1, 2, 3]}), r / "metadata" / "metadata_0001.parquet"),
            "lacks the column(s)",
        ),
        "dtype": (lambda r: np.save(npy(r, 1), np.load(npy(r, 1)).astype("float64")), "float64 vectors"),
        "dim": (lambda r: np.save(npy(r, 1), np.zeros((3, 5), "float16")), "5-d vectors"),
        "record-not-json": (lambda r: (r / "embeddings.json").write_text("{"), "is not JSON"),
    }
    scan = ["scan", "--data", str(data), "--model", str(good), "--pixel-size", "4", "--no-progress"]
    for name, (change, words) in breakages.items():
        root = layout(name, change)
        yield "embedding layout", ["index", "--embeddings", root, "--out", str(work / "i.index")], words
        yield "embedding layout", [*scan, "--out", str(work / f"s-{name}"), "--train-embeddings", root], words

    def unfinished(root):
        with pq.ParquetWriter(root / "catalog.parquet", pa.schema([("id", pa.string())])) as w:
            for k in range(3):
                w.write_table(pa.table({"id": [str(k)]}))

    root = layout("unfinished", unfinished)
    yield "embedding layout", ["index", "--embeddings", root, "--out", str(work / "i.index")], "is incomplete"

    ok = layout("ok")
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli(["index", "--embeddings", ok, "--out", str(work / "ok.index"), "--no-progress"]) == 0
    good_index = (work / "ok.index").read_bytes()
    for name, content in (("random", rng.bytes(len(good_index))), ("empty", b"")):
        index = work / f"{name}.index"
        index.write_bytes(content)
        Path(f"{index}.json").write_bytes(Path(f"{work / 'ok.index'}.json").read_bytes())
        argv = [*scan, "--out", str(work / f"s-{name}"), "--train-index", str(index)]
        yield "index file", argv, "is not a faiss index"
    yield "index file", ["index", "--embeddings", ok, "--out", str(work)], "is a folder"
    yield (
        "index file",
        ["index", "--embeddings", ok, "--out", str(a_file / "i.index")],
        "is a file, not a folder",
    )

    bench = ["bench", "detection", "--model", str(good), "--out", str(work / "b"), "--suite"]
    mem, neg = work / "mem.jsonl", work / "neg.txt"
    mem.write_text('{"caption": "a red circle"}\n')
    neg.write_text("a cat\n")
    for value in ("maybe", "yes", "1", "memorized"):
        parquet = work / f"webster-{value}.parquet"
        pq.write_table(pa.table({"caption": ["a", "b"], "overfit_type": ["MV", value]}), parquet)
        yield "bench suite", [*bench, str(parquet)], "is not a Webster label"
    yield "bench suite", [*bench, str(mem)], "no not-memorized one"
    yield "bench suite", [*bench, str(neg)], "no memorized one"
    yield (
        "bench suite",
        ["bench", "mitigation", "--out", str(work / "m"), "--suite", str(mem), str(neg)],
        "--suite",
    )
    yield "bench suite", [*bench, str(mem), str(neg), "--methods", "wen:bogus=1"], "no option 'bogus'"

    bad_data = work / "bad-imgs"
    bad_data.mkdir()
    (bad_data / "a.png").write_bytes(b"not a png")
    (bad_data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    onnx, empty_onnx = work / "random.onnx", work / "empty.onnx"
    onnx.write_bytes(rng.bytes(4096))
    empty_onnx.write_bytes(b"")
    embed = ["embed", "--pixel-size", "4", "--no-progress", "--data"]
    yield "embed", [*embed, str(bad_data), "--out", str(work / "e-bad")], "has no usable row"
    yield "embed", [*embed, str(data), "--out", str(a_file)], "is a file; expected a folder"
    yield "embed", [*embed, str(data), "--out", str(a_file / "sub")], "is a file, not a folder"
    for path in (onnx, empty_onnx):
        argv = [
            *embed,
            str(data),
            "--out",
            str(work / "e-onnx"),
            "--embedder",
            "sscd",
            "--embedder-file",
            str(path),
        ]
        yield "embed", argv, "is not an ONNX model"

    search = work / "search"
    search.mkdir()
    (search / "study.db").write_bytes(b"not sqlite" * 20)
    memcontrol = ["memcontrol", "--model", str(good), "--data", str(data), "--heldout", str(data), "--out"]
    yield "memcontrol", [*memcontrol, str(search)], "is not a SQLite database"
    yield "memcontrol", [*memcontrol, str(a_file)], "is a file; expected a folder"
    yield "train", ["train", "--model", str(good), "--data", str(data), "--out", str(a_file)], "is a file"
    yield (
        "train",
        ["train", "--model", str(good), "--data", str(data), "--out", str(a_file / "x")],
        "is a file",
    )


def _dataset_rows(work: Path) -> list[tuple[str, int, int, int]]:
    """(case, rows in the file, rows read + reported bad, of which bad) for non-UTF-8 captions."""

    out = []
    for suffix in ("jsonl", "csv"):
        path = work / f"meta.{suffix}"
        if suffix == "jsonl":
            lines = [json.dumps({"id": str(i), "caption": f"c{i}"}).encode() for i in range(20)]
            for k in (3, 11):
                lines[k] = f'{{"id": "{k}", "caption": "caf'.encode() + b"\xe9" + b'"}'
            path.write_bytes(b"\n".join(lines) + b"\n")
        else:
            rows = [f"{i},c{i}".encode() for i in range(20)]
            for k in (3, 11):
                rows[k] = f"{k},caf".encode() + b"\xe9"
            path.write_bytes(b"id,caption\n" + b"\n".join(rows) + b"\n")
        records, bad = split_rows(open_dataset(path, require_image=False, check_files=False))
        out.append((f"non-UTF-8 captions ({suffix})", 20, len(records) + len(bad), len(bad)))
    return out


#: an exception class's name in a message (``FileExistsError:``, ``InvalidProtobuf:``): not for a person
_CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Protobuf)\b|__init__\(\)")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="diffmem-bad-input-"))
    table: dict[str, dict[str, int]] = {}
    misses = []
    try:
        for kind, argv, words in _cases(work):
            row = table.setdefault(
                kind, {"cases": 0, "clear": 0, "traceback": 0, "accepted": 0, "unclear": 0}
            )
            row["cases"] += 1
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = cli(argv)
            except BaseException:  # noqa: BLE001 (an escaped exception is what is counted)
                row["traceback"] += 1
                misses.append((argv, traceback.format_exc().splitlines()[-1]))
                continue
            lines = [x for x in err.getvalue().splitlines() if x.strip()]
            if code == 0:
                row["accepted"] += 1
                misses.append((argv, "exit 0"))
            elif "Traceback" in err.getvalue():
                row["traceback"] += 1
                misses.append((argv, lines[-1] if lines else ""))
            elif (
                code == 2
                and len(lines) == 1
                and ": error: " in lines[0]
                and words in lines[0]
                and not _CLASS_NAME.search(lines[0])
            ):
                row["clear"] += 1
            else:
                row["unclear"] += 1
                misses.append((argv, f"exit {code}: " + " | ".join(lines)))
        rows = _dataset_rows(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        "| bad input class | cases tried | clear errors | tracebacks (goal 0) | bad values accepted (goal 0) | unclear |"
    )
    print("|---|---|---|---|---|---|")
    for kind, r in table.items():
        print(
            f"| {kind} | {r['cases']} | {r['clear']} | {r['traceback']} | {r['accepted']} | {r['unclear']} |"
        )
    print()
    print("| dataset | rows | read or reported bad | reported bad | rows lost (goal 0) |")
    print("|---|---|---|---|---|")
    for case, n, seen, bad in rows:
        print(f"| {case} | {n} | {seen} | {bad} | {n - seen} |")
    for argv, what in misses:
        print(f"MISS {' '.join(argv)} -> {what}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
