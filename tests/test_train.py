"""diffmem train: exact resume after a kill, the step's split, what trains, mitigations wired in, the saved folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffmem.train.adapters import load_trainable_blocks, save_trainable_blocks, transformer_blocks
from diffmem.train.text_to_image import (
    TRAIN_RECORD,
    TrainConfig,
    TrainingData,
    batch_indices,
    load_training_data,
    train_text_to_image,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from diffmem.data import ImageFolderWriter

    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    with ImageFolderWriter(root) as writer:
        for i in range(6):
            pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # resized + centre-cropped to 32
            for c in range(2 if i < 2 else 1):  # two images duplicated
                writer.add(f"im{i}.{c}", f"photo {i}", pixels, image_id=f"im{i}")
    return root


@pytest.fixture(scope="module")
def data(data_dir) -> TrainingData:
    return load_training_data(data_dir, 32)


def _unet(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def _same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def _timeless(record):
    """A run's record or log without what a rerun cannot repeat: wall-clock seconds and the machine."""
    if isinstance(record, dict):
        return {k: _timeless(v) for k, v in record.items() if k not in ("seconds", "machine")}
    if isinstance(record, list):
        return [_timeless(v) for v in record]
    return record


def test_reads_the_data_at_the_resolution_with_copies_grouped(data):
    assert data.pixels.shape == (8, 32, 32, 3) and data.pixels.dtype == np.uint8
    assert data.image_ids[:2] == ["im0", "im0"] and len(set(data.image_ids)) == 6
    assert data.describe()["distinct_images"] == 6


def test_batch_order_does_not_depend_on_the_batch_size():
    whole, epochs = batch_indices(8, 8, 0, seed=1)
    halves = torch.cat([batch_indices(8, 4, s, seed=1)[0] for s in (0, 1)])
    assert torch.equal(whole, halves) and sorted(whole.tolist()) == list(range(8))
    assert batch_indices(8, 4, 2, seed=1)[1].tolist() == [1, 1, 1, 1]


def test_a_killed_run_resumes_to_the_same_weights(tmp_path, data_dir, tiny_sd1_dir):
    cfg = ["--steps", "6", "--batch-size", "4", "--lr", "1e-3", "--checkpoint-every", "2", "--seed", "3"]
    cfg += [
        "--resolution",
        "32",
        "--no-progress",
        "--mitigation",
        "wen-filter",
        "--mitigation-arg",
        "tau=1e9",
    ]
    base = [sys.executable, "-m", "diffmem", "train", "--model", str(tiny_sd1_dir), "--data", str(data_dir)]
    straight = subprocess.run([*base, "--out", str(tmp_path / "a"), *cfg], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    # the same run SIGKILLed while writing its step-4 checkpoint: the step-2 one survives, the run resumes from it
    killer = (
        "import os, signal, sys; import diffmem.train.text_to_image as t; orig = t.save_checkpoint\n"
        "def save(root, step, *a, **k):\n"
        "    if step == 4: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return orig(root, step, *a, **k)\n"
        "t.save_checkpoint = save\n"
        "from diffmem.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    args = [*base[3:], "--out", str(tmp_path / "b"), *cfg]
    killed = subprocess.run([sys.executable, "-c", killer, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "step-00000002"
    ]
    # what a kill inside the writes leaves (the names save_checkpoint's mkdtemp and atomic_write give)
    stale = [tmp_path / "b" / "checkpoints" / ".step-00000004.k2j4a", tmp_path / "b" / ".log.json.x1.tmp"]
    stale[0].mkdir()
    (stale[0] / "model-unet.safetensors").write_bytes(b"partial")
    stale[1].write_text("partial")
    resumed = subprocess.run([*base, "--out", str(tmp_path / "b"), *cfg], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _unet(tmp_path / "a" / "model"), _unet(tmp_path / "b" / "model")
    _same(a, b)
    assert any(not torch.equal(a[k], v) for k, v in _unet(tiny_sd1_dir).items())  # it did train
    # the statistics too: the log and the record's totals cover the whole run, not the part since the resume
    record_a, record_b = (
        _timeless(json.loads((tmp_path / x / "model" / TRAIN_RECORD).read_text())) for x in "ab"
    )
    assert record_a["run"]["totals"]["kept"] == 24  # 6 steps of 4 samples, none dropped at tau = 1e9
    assert record_a == record_b
    log_a, log_b = (_timeless(json.loads((tmp_path / x / "log.json").read_text())) for x in "ab")
    assert log_a == log_b == record_a["run"]["log"] and [r["step"] for r in log_a] == [6]
    # the killed writes' temporary files are gone after the rerun
    assert not any(p.exists() for p in stale) and list((tmp_path / "b").rglob(".*")) == []
    # another setting is refused on resume, with the option named
    changed = subprocess.run(
        [*base, "--out", str(tmp_path / "b"), *cfg, "--weight-decay", "0.5"], capture_output=True, text=True
    )
    assert (
        changed.returncode == 2 and "--weight-decay" in changed.stderr and "Traceback" not in changed.stderr
    )


def test_accumulation_splits_the_step_not_the_result(tmp_path, data, tiny_sd1_dir):
    # plain SGD: Adam's first steps amplify float-rounding differences of near-zero gradients to +-lr
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, seed=1, mitigation="wen-filter", optimizer="sgd",
                      weight_decay=0.0, mitigation_options={"tau": 1e9})  # fmt: skip
    one = train_text_to_image(tiny_sd1_dir, data, tmp_path / "a", cfg, progress=False)
    split = TrainConfig(**{**cfg.to_dict(), "gradient_accumulation": 2})
    two = train_text_to_image(tiny_sd1_dir, data, tmp_path / "b", split, progress=False)
    _same(_unet(one), _unet(two), atol=1e-6)
    # and wen-filter with an unreachable threshold is the plain loss: the same weights as none
    plain = train_text_to_image(
        tiny_sd1_dir, data, tmp_path / "c", TrainConfig(**{**cfg.to_dict(), "mitigation": "none",
                                                              "mitigation_options": {}}), progress=False
    )  # fmt: skip
    _same(_unet(one), _unet(plain), atol=1e-6)


@pytest.mark.slow
def test_two_processes_train_the_same_weights_as_one(tmp_path, data_dir, tiny_sd1_dir):
    """torchrun with 2 CPU processes (accelerate over gloo): each trains half of every step's samples, the
    loss is normalised over the whole step, so plain SGD reaches the one-process weights to float rounding."""
    args = ["train", "--model", str(tiny_sd1_dir), "--data", str(data_dir), "--steps", "2", "--batch-size", "4",
            "--optimizer", "sgd", "--weight-decay", "0", "--lr", "1e-3", "--seed", "1", "--no-progress"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "diffmem", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([*torchrun, "-m", "diffmem", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    record = json.loads((tmp_path / "two" / "model" / TRAIN_RECORD).read_text())
    assert record["run"]["processes"] == 2 and two.stdout.count("fine-tuned pipeline saved") == 1
    a, b = _unet(tmp_path / "one" / "model"), _unet(tmp_path / "two" / "model")
    _same(a, b, atol=1e-6)
    assert max(float((a[k] - v).abs().max()) for k, v in _unet(tiny_sd1_dir).items()) > 1e-5  # it did train


def test_sdxl_fine_tunes_with_its_added_conditions_into_a_stock_folder(tmp_path, data, tiny_sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    from diffmem.train.text_to_image import caption_conditioning

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    cond, added = caption_conditioning(pipe, ["photo 1", "photo 2"], "cpu", (32, 32))
    own, _, pooled, _ = pipe.encode_prompt(
        ["photo 1", "photo 2"], device="cpu", do_classifier_free_guidance=False
    )
    torch.testing.assert_close(cond, own)
    torch.testing.assert_close(added["text_embeds"], pooled)
    assert added["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, seed=1, optimizer="sgd", weight_decay=0.0)
    plain = train_text_to_image(tiny_sdxl_dir, data, tmp_path / "a", cfg, progress=False)
    loaded = StableDiffusionXLPipeline.from_pretrained(plain)  # a stock SDXL folder
    assert json.loads((plain / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert "`StableDiffusionXLPipeline.from_pretrained(folder)`" in (plain / "README.md").read_text()
    assert loaded(["photo 1"], num_inference_steps=2, height=32, width=32, output_type="np").images.shape == (
        1,
        32,
        32,
        3,
    )
    a, base = _unet(plain), _unet(tiny_sdxl_dir)
    assert any(not torch.equal(a[k], v) for k, v in base.items())
    # wen-filter's noise gaps run the SDXL UNet with both captions' added conditions: an unreachable
    # threshold is the plain loss, a threshold below every gap leaves the model as it was
    high = TrainConfig(**{**cfg.to_dict(), "mitigation": "wen-filter", "mitigation_options": {"tau": 1e9}})
    _same(a, _unet(train_text_to_image(tiny_sdxl_dir, data, tmp_path / "b", high, progress=False)), atol=1e-6)
    low = TrainConfig(**{**high.to_dict(), "mitigation_options": {"tau": 1e-9}, "caption_dropout": 0.0})
    _same(base, _unet(train_text_to_image(tiny_sdxl_dir, data, tmp_path / "c", low, progress=False)))
    # MemControl's objectives on SDXL: the noise gap is 0 for empty captions, positive for captions
    from diffmem.train.memcontrol import memorization_metric, validation_loss

    assert memorization_metric(pipe, data) > 0 and np.isfinite(validation_loss(pipe, data))
    empty = TrainingData(data.pixels, [""] * len(data), data.row_ids, data.image_ids)
    assert memorization_metric(pipe, empty) == pytest.approx(0.0, abs=1e-4)  # batch-size rounding
    with pytest.raises(ValueError, match="--train-text-encoder: not supported for SDXL"):
        train_text_to_image(tiny_sdxl_dir, data, tmp_path / "d", TrainConfig(steps=1, batch_size=4,
                            train_text_encoder=True), progress=False)  # fmt: skip


def test_wen_filter_that_drops_every_sample_leaves_the_model_unchanged(tmp_path, data, tiny_sd1_dir):
    # caption dropout off: an empty caption's gap is 0, below any threshold
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, caption_dropout=0.0, mitigation="wen-filter",
                      mitigation_options={"tau": 1e-9})  # fmt: skip
    out = train_text_to_image(tiny_sd1_dir, data, tmp_path / "w", cfg, progress=False)
    _same(_unet(out), _unet(tiny_sd1_dir))
    log = json.loads((tmp_path / "w" / "log.json").read_text())
    assert log[-1]["dropped"] == 8 and log[-1]["kept"] == 0 and log[-1]["loss"] is None
    totals = json.loads((out / TRAIN_RECORD).read_text())["run"]["totals"]
    assert totals["dropped"] == 8 and totals["kept"] == 0 and totals["gap_max"] >= totals["gap_mean"] > 0


def test_log_numbers_add_counts_average_means_and_take_maxima():
    from diffmem.train.text_to_image import merge_stats

    parts = [
        {"dropped": 1.0, "gap_mean": 2.0, "gap_max": 5.0},
        {"dropped": 3.0, "gap_mean": 4.0, "gap_max": 4.0},
        {"kept": 2.0},
    ]
    assert merge_stats(parts) == {"dropped": 4.0, "gap_mean": 3.0, "gap_max": 5.0, "kept": 2.0}


def test_lora_in_chosen_blocks_changes_only_those_blocks(tmp_path, data, tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")
    blocks = transformer_blocks(unet)
    assert blocks[0].startswith("down_blocks.") and any(b.startswith("up_blocks.") for b in blocks)
    chosen = blocks[:1]
    file = save_trainable_blocks(tmp_path / "mask.json", unet, chosen, source="test")
    assert load_trainable_blocks(file, unet) == chosen
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, mode="lora", trainable_blocks=tuple(chosen),
                      mitigation="ambient", mitigation_options={"t_n": 100})  # fmt: skip
    out = train_text_to_image(tiny_sd1_dir, data, tmp_path / "l", cfg, progress=False)
    after, before = _unet(out), _unet(tiny_sd1_dir)
    assert after.keys() == before.keys()  # merged: a plain UNet
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith(chosen[0] + ".") for k in changed)
    record = json.loads((out / TRAIN_RECORD).read_text())
    assert record["mitigation"] == {"name": "ambient", "t_n": 100, "seed": 0}
    assert record["run"]["trainable_parameters"] > 0 and "ambient" in (out / "README.md").read_text()
    StableDiffusionPipeline.from_pretrained(out)  # a stock diffusers folder


def test_a_block_file_is_refused_on_another_architecture(tmp_path, tiny_sd1_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1_dir / "unet")
    file = save_trainable_blocks(tmp_path / "mask.json", unet, transformer_blocks(unet)[:1])
    other = UNet2DConditionModel(**{**unet.config, "block_out_channels": (32, 32)})
    with pytest.raises(ValueError, match="another UNet architecture"):
        load_trainable_blocks(file, other)
    (tmp_path / "bad.json").write_text('{"blocks": ["nope"]}')
    with pytest.raises(ValueError, match="not a trainable-blocks file"):
        load_trainable_blocks(tmp_path / "bad.json", unet)


def test_cli_bad_input_is_one_line(tmp_path, data_dir, tiny_sd1_dir, capsys):
    from diffmem.cli import main

    base = ["train", "--model", str(tiny_sd1_dir), "--data", str(data_dir), "--out", str(tmp_path / "o")]
    assert main([*base, "--mitigation", "wen-filter", "--mitigation-arg", "tau=-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tau" in err[0]
    assert main([*base, "--mitigation-arg", "nokey"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main([*base, "--batch-size", "3", "--gradient-accumulation", "2", "--resolution", "32"]) == 2
    assert "multiple of 2" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o" / "model")
