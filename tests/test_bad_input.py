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
