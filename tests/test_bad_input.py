"""Bad input everywhere: one clear line naming the argument, file, component or row, never a traceback.

Every case builds its own bad input (a broken copy of the tiny model folder, a Latin-1 file, a pickle)
and asserts the exit code and the words of the message.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile

import pytest
import torch

from diffmem.cli import main


class _Evil:
    """Unpickling this calls print: what a hostile pickle could run."""

    def __reduce__(self):
        return (print, ("pickle code ran",))


def _pickle_file(path):
    with open(path, "wb") as f:
        pickle.dump({"weights": _Evil()}, f)
    return path


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def _detect(model, tmp_path) -> list[str]:
    """``diffmem detect`` on ``model`` with a valid prompts file."""
    prompts = str(_prompts(tmp_path))
    return ["detect", "--model", str(model), "--prompts", prompts, "--out", str(tmp_path / "o.jsonl")]


def _prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a photo of a cat\n", encoding="utf-8")
    return path


@pytest.fixture()
def broken(tiny_sd1_dir, tmp_path):
    """A fresh copy of the tiny model folder, for one test to break."""
    return shutil.copytree(tiny_sd1_dir, tmp_path / "model")


# ------------------------------------------------------------------------------------------- model folders
def _only_bin(folder):
    unet = folder / "unet"
    state = {}
    from safetensors.torch import load_file

    state = load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet / "diffusion_pytorch_model.bin")


@pytest.mark.parametrize(
    "breakage, words",
    [
        (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "unet has no weights file"),
        (_only_bin, "only pickle weights (diffusion_pytorch_model.bin)"),
        (
            lambda f: (f / "unet" / "config.json").write_text("{not json"),
            "unet config.json) is not valid JSON",
        ),
        (lambda f: (f / "model_index.json").write_text("[1, 2]"), "must hold a JSON object"),
        (
            lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
                (f / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000]
            ),
            "is truncated",
        ),
        (lambda f: [p.unlink() for p in (f / "tokenizer").iterdir()], "tokenizer has no tokenizer files"),
        (lambda f: shutil.rmtree(f / "text_encoder"), "lacks the component(s) text_encoder"),
    ],
    ids=[
        "no-weights",
        "only-bin",
        "config-not-json",
        "index-not-object",
        "truncated",
        "empty-tokenizer",
        "missing",
    ],
)
def test_broken_model_folders_name_folder_and_component(broken, tmp_path, capsys, breakage, words):
    breakage(broken)
    code, err = _run(_detect(broken, tmp_path), capsys)
    assert code == 2 and err.startswith("diffmem detect: error: --model: ") and words in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_pickle_weights_load_only_when_asked_for(broken, capsys):
    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    from diffmem.modelio import check_sd_folder

    _only_bin(broken)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: .* only pickle weights"):
        StableDiffusionMemGuardPipeline.from_pretrained(broken)  # the Python API refuses it too
    check_sd_folder(broken, allow_pickle=True)
    pipe = StableDiffusionMemGuardPipeline.from_pretrained(broken, use_safetensors=False)  # explicit opt-in
    assert pipe.unet is not None


def test_hub_id_offline_and_missing_cuda_get_one_line(tmp_path, capsys):
    prompts = str(_prompts(tmp_path))
    code, err = _run(
        ["detect", "--model", "nobody/nothing", "--prompts", prompts, "--out", str(tmp_path / "o.jsonl")],
        capsys,
    )
    assert code == 2 and "nobody/nothing is not a folder here" in err and "Traceback" not in err
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["localize", "--prompts", prompts, "--reference-prompts", prompts, "--out", str(tmp_path / "o")]
    code, err = _run([*argv, "--device", "cuda"], capsys)
    assert code == 2 and "--device: cuda was asked for, but CUDA is not available here" in err


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "argv, words",
    [
        (["demo", "--threshold", "nan"], "argument --threshold: expected a finite number, got 'nan'"),
        (["demo", "--threshold", "-1"], "argument --threshold: expected a number >= 0, got -1.0"),
        (["demo", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
        (
            ["localize", "--prompts", "p", "--out", "o", "--threshold", "inf"],
            "expected a finite number, got 'inf'",
        ),
        (["attack", "--targets", "t", "--out", "o", "--threshold", "-0.5"], "expected a number >= 0"),
        (
            ["detect", "--prompts", "p", "--out", "o", "--num-gens", "two"],
            "argument --num-gens: expected an integer, got 'two'",
        ),
        (["attack", "--targets", "t", "--out", "o", "--lr", "0"], "argument --lr: expected a number > 0"),
    ],
)
def test_numbers_are_checked_where_they_are_parsed(argv, words, capsys):
    code, err = _run(argv, capsys)
    assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_steps_against_the_schedule(tmp_path, capsys):
    prompts = str(_prompts(tmp_path))
    code, err = _run(
        [
            "localize",
            "--prompts",
            prompts,
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
            "--reference-prompts",
            prompts,
        ],
        capsys,
    )
    assert code == 2 and "--steps: NeMo's criterion reads timesteps[1]" in err
    argv = ["localize", "--prompts", prompts, "--out", str(tmp_path / "o"), "--reference-prompts", prompts]
    code, err = _run([*argv, "--ssim-range", "-1"], capsys)
    assert code == 2 and "--ssim-range: expected 'inferred' or a number > 0, got '-1'" in err
    assert len(err.splitlines()) == 1, err
    code, err = _run(
        [
            "detect",
            "--prompts",
            prompts,
            "--out",
            str(tmp_path / "o.jsonl"),
            "--steps",
            "30",
            "--num-inference-steps",
            "25",
        ],
        capsys,
    )
    assert code == 2 and "--start/--steps" in err
    from diffmem.localize.nemo import NemoConfig

    with pytest.raises(ValueError, match="num_inference_steps"):
        NemoConfig(num_inference_steps=1)


# -------------------------------------------------------------------------------------- files and rows
def test_text_files_that_are_not_utf8_name_file_and_line(tmp_path, capsys):
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("a cat\nune tête de chat\n".encode("latin-1"))
    code, err = _run(["detect", "--prompts", str(latin), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert code == 2 and f"--prompts: {latin} line 2 is not UTF-8 (byte 0xea)" in err
    code, err = _run(["prune", "--memorized", str(latin), "--out", str(tmp_path / "m.safetensors")], capsys)
    assert code == 2 and f"--memorized: {latin} line 2 is not UTF-8" in err


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_non_utf8_caption_is_one_bad_row_and_the_rest_is_read(tmp_path, suffix):
    from diffmem.data import open_dataset, split_rows

    path = tmp_path / f"metadata.{suffix}"
    if suffix == "jsonl":
        lines = [json.dumps({"id": str(i), "caption": f"caption {i}"}).encode() for i in range(4)]
        lines[1] = b'{"id": "1", "caption": "caf\xe9"}'
        path.write_bytes(b"\n".join(lines) + b"\n")
    else:
        path.write_bytes(b"id,caption\n0,caption 0\n1,caf\xe9\n2,caption 2\n3,caption 3\n")
    records, bad = split_rows(open_dataset(path, require_image=False, check_files=False))
    assert [r.id for r in records] == ["0", "2", "3"]
    assert len(bad) == 1 and "not UTF-8" in bad[0].detail and "0xe9" in bad[0].detail


def test_missing_targets_name_targets(tmp_path, capsys):
    code, err = _run(["attack", "--targets", str(tmp_path / "missing"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err.startswith("diffmem attack: error: --targets: ") and "--data" not in err


# ---------------------------------------------------------------------------------------------- pickles
def test_pickles_offered_as_edits_or_embedders_are_named_and_never_run(tmp_path, capsys):
    from diffmem.embed.clip import load_state_dict
    from diffmem.embed.sscd import load_sscd_torchscript

    evil = _pickle_file(tmp_path / "evil.pkl")
    code, err = _run(
        ["attack", "--targets", str(tmp_path), "--out", str(tmp_path / "o"), "--neurons", str(evil)], capsys
    )
    assert code == 2 and "--neurons: " in err and "not a NeuronSet" in err and "pickle" in err
    with pytest.raises(ValueError, match="holding more than tensors") as info:
        load_state_dict(evil, allow_pickle=True)
    assert "weights_only=False" not in str(info.value)
    saved = tmp_path / "saved.pt"
    torch.save({"w": torch.zeros(1)}, saved)  # a torch.save zip: no code/ folder
    assert zipfile.is_zipfile(saved)
    for path in (evil, saved):
        with pytest.raises(ValueError, match="not a TorchScript archive"):
            load_sscd_torchscript(path, allow_torchscript=True)
    assert "pickle code ran" not in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the boundary
def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import diffmem.commands.demo as demo

    def boom(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(demo, "run", boom)
    code, err = _run(["demo"], capsys)
    assert code == 1 and err == (
        "diffmem demo: error: RuntimeError: something inside broke (rerun with --debug for the traceback)"
    )
    with pytest.raises(RuntimeError, match="inside broke"):
        main(["--debug", "demo"])
    monkeypatch.setenv("DIFFMEM_DEBUG", "1")
    with pytest.raises(RuntimeError):
        main(["demo"])


def test_allow_pickle_is_explicit_and_scoped_to_the_call(broken, tmp_path, capsys, monkeypatch):
    import os

    import diffmem.commands.detect as detect

    _only_bin(broken)
    argv = _detect(broken, tmp_path)
    code, err = _run(argv, capsys)
    assert code == 2 and "only pickle weights" in err
    seen = {}

    def check_only(args):
        from diffmem.modelio import check_sd_folder

        check_sd_folder(args.model)  # what every command's loading does first
        seen["env"] = os.environ.get("DIFFMEM_ALLOW_PICKLE")
        return 0

    monkeypatch.setattr(detect, "run", check_only)
    assert main(["--allow-pickle", *argv]) == 0 and seen["env"] == "1"
    assert "DIFFMEM_ALLOW_PICKLE" not in os.environ  # scoped to that call


# ------------------------------------------------------------------------ embedding layouts and indexes
def _layout(tmp_path, name="emb"):
    """A valid two-shard layout (4 + 3 unit vectors of 8 dims, float16) made by ``write_vectors``."""
    import numpy as np

    from diffmem.scan.layout import write_vectors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 8)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_vectors(tmp_path / name, [x[:4], x[4:]], {"embedder": "synthetic", "dim": 8})
    return tmp_path / name


def _scan_prebuilt(tmp_path, layout) -> list[str]:
    """``diffmem scan`` of a one-image folder against the prebuilt ``layout`` (opened before any model)."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    return ["scan", "--data", str(folder), "--out", str(tmp_path / "s"), "--train-embeddings", str(layout),
            "--no-progress"]  # fmt: skip


def _index(layout, tmp_path) -> list[str]:
    return ["index", "--embeddings", str(layout), "--out", str(tmp_path / "i.index"), "--no-progress"]


def _drop_a_row(layout):
    import numpy as np

    path = layout / "img_emb" / "img_emb_0000.npy"
    np.save(path, np.load(path)[:3])  # 3 vectors, the metadata still 4 rows: every later id would shift


def _truncate(layout):
    path = layout / "img_emb" / "img_emb_0001.npy"
    path.write_bytes(path.read_bytes()[:-10])


def _no_columns(layout):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [1, 2, 3]}), layout / "metadata" / "metadata_0001.parquet")


def _float32(layout):
    import numpy as np

    path = layout / "img_emb" / "img_emb_0001.npy"
    np.save(path, np.load(path).astype("float32"))


def _other_dim(layout):
    import numpy as np

    path = layout / "img_emb" / "img_emb_0001.npy"
    np.save(path, np.zeros((3, 4), "float16"))


LAYOUT_CASES = [
    (_drop_a_row, "img_emb_0000.npy holds 3 vectors but {root}/metadata/metadata_0000.parquet has 4 rows"),
    (_truncate, "img_emb_0001.npy is truncated: its header says (3, 8) float16"),
    (lambda r: (r / "metadata" / "metadata_0001.parquet").unlink(), "metadata_0001.parquet is missing"),
    (lambda r: (r / "metadata" / "metadata_0000.parquet").write_bytes(b"junk" * 10), "is not a parquet file"),
    (_no_columns, "metadata_0001.parquet lacks the column(s) image_path, caption, id, row"),
    (lambda r: (r / "img_emb" / "img_emb_0000.npy").write_bytes(b""), "img_emb_0000.npy is not a NumPy .npy"),
    (_float32, "img_emb_0001.npy holds float32 vectors; embeddings.json says float16"),
    (_other_dim, "img_emb_0001.npy holds 4-d vectors; expected 8-d"),
    (lambda r: (r / "embeddings.json").write_text("{oops"), "embeddings.json is not JSON"),
]
LAYOUT_IDS = ["short-npy", "truncated", "no-parquet", "not-parquet", "no-columns", "empty-npy", "dtype",
              "dim", "record-not-json"]  # fmt: skip


@pytest.mark.parametrize("command", ["index", "scan"])
@pytest.mark.parametrize("breakage, words", LAYOUT_CASES, ids=LAYOUT_IDS)
def test_a_broken_layout_is_refused_naming_the_shard(tmp_path, capsys, command, breakage, words):
    pytest.importorskip("faiss")
    layout = _layout(tmp_path)
    breakage(layout)
    argv = _index(layout, tmp_path) if command == "index" else _scan_prebuilt(tmp_path, layout)
    argument = "--embeddings" if command == "index" else "--train-embeddings"
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith(f"diffmem {command}: error: {argument}: {layout}"), err
    assert words.format(root=layout) in err and len(err.splitlines()) == 1, err
    assert "Error" not in err  # no exception class names


def test_an_unfinished_embed_layout_is_refused(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    layout = _layout(tmp_path)
    with pq.ParquetWriter(layout / "catalog.parquet", pa.schema([("id", pa.string())])) as w:
        for k in range(3):  # three catalog shards, two embedded
            w.write_table(pa.table({"id": [str(k)]}))
    code, err = _run(_index(layout, tmp_path), capsys)
    assert (
        code == 2
        and "is incomplete: 1 of its 3 shards are not embedded (img_emb_NNNN.npy for shard 2)" in err
    )


def test_an_index_that_is_not_one_or_disagrees_with_its_layout_is_refused(tmp_path, capsys):
    pytest.importorskip("faiss")
    import faiss
    import numpy as np

    from diffmem.scan.index_file import IndexFile
    from diffmem.scan.layout import EmbeddingLayout, write_vectors

    layout = _layout(tmp_path)
    assert main(_index(layout, tmp_path)) == 0
    index = tmp_path / "i.index"
    good = index.read_bytes()
    for data, words in [
        (np.random.default_rng(0).bytes(len(good)), f"--train-index: {index} is not a faiss index"),
        (b"", f"--train-index: {index} is not a faiss index (or is truncated or damaged; 0 bytes)"),
    ]:
        index.write_bytes(data)
        with pytest.raises(ValueError) as info:
            IndexFile(index, EmbeddingLayout(layout))
        assert str(info.value).startswith(words) and "\n" not in str(info.value), info.value
    faiss.write_index(faiss.IndexFlatIP(8), str(index))  # an empty index under the 7-vector record
    with pytest.raises(ValueError, match=r"i.index holds 0 vectors of 8; its layout .* holds 7 of 8"):
        IndexFile(index, EmbeddingLayout(layout))
    other = write_vectors(tmp_path / "other", [np.zeros((5, 8), "float32")], {"embedder": "x"})
    with pytest.raises(ValueError, match="indexes another set of embeddings"):
        IndexFile(index, other)


# ------------------------------------------------------------------------------------------ bench suites
def test_bench_suites_with_bad_labels_or_one_class_are_refused_before_the_model(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    webster = tmp_path / "sd1.parquet"
    pq.write_table(pa.table({"caption": ["a", "b"], "overfit_type": ["MV", "maybe"]}), webster)
    mem, neg = tmp_path / "mem.jsonl", tmp_path / "neg.txt"
    mem.write_text('{"caption": "a red circle"}\n{"caption": "a blue star"}\n')
    neg.write_text("a cat\n")
    missing_model = str(tmp_path / "no-model")  # the suite is checked before any model is looked at
    bench = ["bench", "detection", "--model", missing_model, "--out", str(tmp_path / "b"), "--suite"]
    code, err = _run([*bench, str(webster)], capsys)
    assert (
        code == 2 and f"{webster} row 1: overfit_type 'maybe' is not a Webster label; expected one of" in err
    )
    code, err = _run([*bench, str(mem)], capsys)
    assert code == 2 and f"--suite: {mem}: 2 memorized prompt(s) and no not-memorized one; AUC" in err
    code, err = _run([*bench, str(neg)], capsys)
    assert code == 2 and ": 1 not-memorized prompt(s) and no memorized one" in err
    code, err = _run(["bench", "mitigation", "--model", missing_model, "--out", str(tmp_path / "m"), "--suite",
                      str(mem), str(neg)], capsys)  # fmt: skip
    assert code == 2 and "--suite: the mitigation bench measures replication on the organism's" in err
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------- embed
def test_embed_with_no_usable_row_fails_with_the_bad_row_counts(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    (folder / "b.png").write_bytes(b"")
    rows = [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "emb"
    code, err = _run(
        ["embed", "--data", str(folder), "--out", str(out), "--pixel-size", "4", "--no-progress"], capsys
    )
    assert code == 2 and f"--data: {folder} has no usable row: 2 read, 2 bad (by reason: " in err, err
    assert len(err.splitlines()) == 1
    assert json.loads((out / "embed_summary.json").read_text())["bad_rows"] == 2  # the record stays


def test_embed_rerun_removes_the_temporary_files_of_killed_writes(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(f'{{"file_name": "{i}.png", "text": "c{i}"}}\n' for i in range(3))
    )
    out = tmp_path / "emb"
    argv = [
        "embed",
        "--data",
        str(folder),
        "--out",
        str(out),
        "--pixel-size",
        "4",
        "--shard-size",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    # what a SIGKILL between atomic_write's mkstemp and its rename leaves (the names it gives)
    left = [out / "metadata" / ".metadata_0007.parquet.k2j4a.tmp", out / "bad_images" / ".bad_images_0012.parquet.x.tmp",
            out / "img_emb" / ".img_emb_0001.npy.q1.tmp", out / ".embed_summary.json.z.tmp"]  # fmt: skip
    for path in left:
        path.write_bytes(b"partial")
    keep = out / "metadata" / "notes.tmp"  # not a name atomic_write gives: left alone
    keep.write_text("mine")
    assert main(argv) == 0
    assert not any(p.exists() for p in left) and keep.exists()
    assert sorted(p.name for p in out.rglob(".*.tmp")) == []


# ------------------------------------------------------------------ foreign files and --out collisions
def _one_image(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a", "memorized": true}\n')
    return folder


def test_out_paths_of_the_wrong_kind_are_named(tmp_path, capsys):
    data = _one_image(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    layout = _layout(tmp_path)
    embed = ["embed", "--data", str(data), "--pixel-size", "4", "--no-progress", "--out"]
    memcontrol = ["memcontrol", "--data", str(data), "--heldout", str(data), "--out"]
    cases = [
        ([*embed, str(a_file)], f"embed: error: --out: {a_file} is a file; expected a folder (new, or one to resume)"),
        ([*embed, str(a_file / "sub")], f"--out: {a_file / 'sub'} cannot be made: {a_file} is a file, not a folder"),
        (["index", "--embeddings", str(layout), "--out", str(tmp_path)],
         f"index: error: --out: {tmp_path} is a folder; expected the path of a file to write"),
        (["index", "--embeddings", str(layout), "--out", str(a_file / "i.index")], f"{a_file} is a file, not a folder"),
        ([*memcontrol, str(a_file)], f"memcontrol: error: --out: {a_file} is a file; expected a folder"),
        (["train", "--data", str(data), "--out", str(a_file)], f"train: error: --out: {a_file} is a file; expected"),
    ]  # fmt: skip
    for argv, words in cases:
        code, err = _run(argv, capsys)
        assert code == 2 and words in err and len(err.splitlines()) == 1, (argv, err)


def test_a_study_db_that_is_not_sqlite_is_named_before_the_model_loads(tmp_path, capsys):
    data = _one_image(tmp_path)
    out = tmp_path / "search"
    out.mkdir()
    (out / "study.db").write_bytes(b"\x00garbage" * 64)
    argv = ["memcontrol", "--model", str(tmp_path / "no-model"), "--data", str(data), "--heldout", str(data),
            "--out", str(out)]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 2 and f"--out: {out / 'study.db'} is not a SQLite database (the optuna study" in err, err


def test_an_onnx_file_of_random_bytes_is_named(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import numpy as np

    data = _one_image(tmp_path)
    onnx = tmp_path / "sscd.onnx"
    onnx.write_bytes(np.random.default_rng(0).bytes(4096))
    argv = ["embed", "--data", str(data), "--out", str(tmp_path / "e"), "--embedder", "sscd", "--embedder-file",
            str(onnx), "--no-progress"]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 2 and f"--embedder-file: {onnx} is not an ONNX model onnxruntime can load (" in err, err
    assert "InvalidProtobuf" not in err and "ONNXRuntimeError" not in err


def test_unknown_method_options_name_the_accepted_ones(tiny_sd1_dir, tmp_path, capsys):
    from diffmem.detectors import get_detector
    from diffmem.train.mitigations import get_training_mitigation

    with pytest.raises(ValueError) as info:
        get_detector("wen", {"bogus": 1})
    assert str(info.value) == "detector_options for 'wen': no option 'bogus'; its options: steps, start"
    with pytest.raises(ValueError, match="for 'none': no option 'tau'; its options: none"):
        get_training_mitigation("none", {"tau": 1})
    code, err = _run(["bench", "detection", "--model", str(tiny_sd1_dir), "--methods", "wen:bogus=1",
                      "--out", str(tmp_path / "b")], capsys)  # fmt: skip
    assert code == 2 and "no option 'bogus'; its options: steps, start" in err and "__init__" not in err, err


def test_os_errors_over_a_path_of_the_wrong_kind_are_bad_input(monkeypatch, capsys):
    import errno

    import diffmem.commands.demo as demo

    def in_the_way(args):
        raise FileExistsError(errno.EEXIST, "File exists", "/tmp/somewhere")

    monkeypatch.setattr(demo, "run", in_the_way)
    code, err = _run(["demo"], capsys)
    assert code == 2 and err == (
        "diffmem demo: error: /tmp/somewhere: a file is in the way (a folder was expected there)"
    )


def test_scan_with_a_random_bytes_index_prints_one_line_and_no_loading_bars(tiny_sd1_dir, tmp_path, capsys):
    """Through the CLI, after the model loads: one line, exit 2, and --no-progress hides the loading bars."""
    pytest.importorskip("faiss")
    from diffusers.utils import logging as diffusers_logging

    from diffmem.embed import load_embedder
    from diffmem.scan.layout import write_vectors

    describe = load_embedder("pixel", pixel_size=4).describe()
    vectors = torch.nn.functional.normalize(torch.randn(5, describe["dim"]), dim=1).numpy()
    layout = tmp_path / "emb"
    write_vectors(layout, [vectors], describe)
    index = tmp_path / "i.index"
    assert main(["index", "--embeddings", str(layout), "--out", str(index), "--no-progress"]) == 0
    index.write_bytes(index.read_bytes()[:40])  # truncated
    argv = [*_scan_prebuilt(tmp_path, layout)[:-3], "--model", str(tiny_sd1_dir), "--pixel-size", "4",
            "--train-index", str(index), "--no-progress"]  # fmt: skip
    capsys.readouterr()
    code, err = _run(argv, capsys)
    assert code == 2 and err == (
        f"diffmem scan: error: --train-index: {index} is not a faiss index (or is truncated or damaged; "
        "40 bytes); rebuild it with `diffmem index`"
    )
    assert diffusers_logging.is_progress_bar_enabled()  # hidden for the load only
