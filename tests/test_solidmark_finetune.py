"""Keyed fine-tuning: checkpoints, exact resume, both prediction types, a loadable SD folder with provenance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffmem.data import write_image_folder
from diffmem.solidmark import key_dataset
from diffmem.train.keyed_finetune import PROVENANCE_FILE, FinetuneConfig, finetune_keyed


@pytest.fixture(scope="module")
def keyed_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("keyed-ft")
    rng = np.random.default_rng(0)
    items = [(f"im{i}", f"photo {i}", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for i in range(3)]
    write_image_folder(root / "src", items + [("im0b", "photo 0", items[0][2])])
    key_dataset(root / "src", root / "keyed", frame_width=8, duplicate_keys="shared", progress=False)
    return root / "keyed"


def _unet_weights(folder):
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.mark.parametrize("lr_scheduler", ["constant", "linear"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, keyed_dir, tiny_sd1_dir, lr_scheduler):
    tiny_sd_dir = tiny_sd1_dir
    cfg = FinetuneConfig(
        steps=4, batch_size=2, lr=1e-3, checkpoint_every=2, seed=3, lr_scheduler=lr_scheduler
    )
    straight = finetune_keyed(tiny_sd_dir, keyed_dir, tmp_path / "a", config=cfg, progress=False)
    # the same run interrupted after 2 steps (its checkpoint), then resumed to 4
    finetune_keyed(tiny_sd_dir, keyed_dir, tmp_path / "b", config=cfg, progress=False, until_step=2)
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / "state.json").is_file()
    resumed = finetune_keyed(tiny_sd_dir, keyed_dir, tmp_path / "b", config=cfg, progress=False)
    a, b = _unet_weights(straight), _unet_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = _unet_weights(tiny_sd_dir)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it did train
    prov = json.loads((straight / PROVENANCE_FILE).read_text())
    assert prov["steps_done"] == 4 and prov["manifest"]["duplicate_keys"] == "shared"
    assert len(json.loads((tmp_path / "a" / "log.json").read_text())) >= 1

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(straight)
    assert (
        pipe.scheduler.config.prediction_type
        == StableDiffusionPipeline.from_pretrained(tiny_sd_dir).scheduler.config.prediction_type
    )

    with pytest.raises(ValueError, match="other settings"):
        finetune_keyed(tiny_sd_dir, keyed_dir, tmp_path / "b", config=FinetuneConfig(**{**cfg.to_dict(), "lr": 1.0}),
                       progress=False)  # fmt: skip
    # a finished 4-step run cannot be "resumed" to fewer steps: that would save the 4-step weights
    with pytest.raises(ValueError, match="past --steps 3"):
        finetune_keyed(tiny_sd_dir, keyed_dir, tmp_path / "b", config=FinetuneConfig(**{**cfg.to_dict(), "steps": 3}),
                       progress=False)  # fmt: skip


def test_refuses_an_unknown_lr_scheduler(tmp_path, keyed_dir, tiny_sd1_dir):
    with pytest.raises(ValueError, match="--lr-scheduler: expected one of .*linear.*got 'exponential'"):
        finetune_keyed(
            tiny_sd1_dir, keyed_dir, tmp_path / "w", config=FinetuneConfig(lr_scheduler="exponential")
        )


def test_refuses_an_unkeyed_dataset(tmp_path, keyed_dir, tiny_sd1_dir):
    with pytest.raises(FileNotFoundError, match="manifest"):
        finetune_keyed(tiny_sd1_dir, keyed_dir.parent / "src", tmp_path / "w", progress=False)


def test_cli_finetune_a_v_prediction_model(tmp_path, keyed_dir, tiny_sd2_dir):
    from diffmem.cli import main

    args = ["solidmark", "finetune", "--model", str(tiny_sd2_dir), "--data", str(keyed_dir)]
    args += ["--workdir", str(tmp_path / "w"), "--steps", "1", "--batch-size", "2"]
    assert main(args) == 0
    assert (tmp_path / "w" / "model" / "model_index.json").is_file()
    prov = json.loads((tmp_path / "w" / "model" / PROVENANCE_FILE).read_text())
    assert prov["steps_done"] == 1 and np.isfinite(prov["final_loss"])


def test_gradient_checkpointing_gives_the_same_weights_and_may_change_on_resume(
    tmp_path, keyed_dir, tiny_sd1_dir, monkeypatch
):
    import torch.utils.checkpoint

    calls, original = [0], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    cfg = FinetuneConfig(steps=2, batch_size=2, lr=1e-3, checkpoint_every=1, seed=3)
    plain = finetune_keyed(tiny_sd1_dir, keyed_dir, tmp_path / "a", config=cfg, progress=False)
    assert calls[0] == 0
    # step 1 with checkpointing, interrupted; step 2 resumed without it: the run is the same run
    checkpointed = FinetuneConfig(**{**cfg.to_dict(), "gradient_checkpointing": True})
    finetune_keyed(tiny_sd1_dir, keyed_dir, tmp_path / "b", config=checkpointed, progress=False, until_step=1)
    assert calls[0] > 0
    mixed = finetune_keyed(tiny_sd1_dir, keyed_dir, tmp_path / "b", config=cfg, progress=False)
    a, b = _unet_weights(plain), _unet_weights(mixed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5)
    # and a whole run with it logs the same losses
    finetune_keyed(tiny_sd1_dir, keyed_dir, tmp_path / "c", config=checkpointed, progress=False)
    log_a, log_c = (json.loads((tmp_path / d / "log.json").read_text()) for d in "ac")
    assert [r["loss"] for r in log_c] == pytest.approx([r["loss"] for r in log_a], abs=1e-5)
    # the folder's config loads without the setting (diffusers keeps it off the saved UNet)
    from diffusers import UNet2DConditionModel

    assert not UNet2DConditionModel.from_pretrained(mixed / "unet").is_gradient_checkpointing
