"""Every model-loading command finishes on random weights in SD-1.5's real architecture (860M-parameter
UNet) at 128 px, with the layers discovered at real width: 16 cross-attention layers, 5,760 value
neurons in the down and mid blocks, 16 FFN layers. Slow (several minutes on 2 cores); CI runs it."""

from __future__ import annotations

import json

import pytest

from diffmem.benchmark import real_size_commands, real_size_inputs
from diffmem.cli import main

PX = 128


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    from diffmem.tiny import build_sd_architecture_pipeline

    path = tmp_path_factory.mktemp("sd15-random")
    build_sd_architecture_pipeline("sd15", image_size=PX).save_pretrained(path)
    return path


@pytest.mark.slow
def test_every_command_finishes_at_sd15_size(sd15_dir, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from diffmem.hooks.attention import cross_attention_layers
    from diffmem.hooks.ffn import ffn_layers
    from diffmem.hooks.neurons import value_layers

    unet = UNet2DConditionModel.from_pretrained(sd15_dir / "unet")
    assert len(cross_attention_layers(unet)) == 16
    assert sum(m.out_features for m in value_layers(unet).values()) == 5760
    assert len(ffn_layers(unet, ("down", "mid", "up"))) == 16
    del unet
    inputs = real_size_inputs(tmp_path / "inputs", PX)
    out = tmp_path / "out"
    for name, argv in real_size_commands(str(sd15_dir), inputs, out, PX, ["--dtype", "bfloat16"]).items():
        assert main(argv) == 0, name
    printed = capsys.readouterr().out
    scores = [json.loads(line) for line in (out / "detect.jsonl").read_text().splitlines()]
    assert [(r["height"], r["dtype"]) for r in scores] == [(PX, "bfloat16")] * 2
    assert "at threshold" in printed and f"{PX}x{PX} px" in printed
    found = json.loads((out / "localize" / "neurons" / "0.json").read_text())
    assert found["info"]["config"]["latent_size"] == [PX // 8, PX // 8]
    # the forced search over all 5,760 candidates is cut by its budget, exactly
    assert found["info"]["outcome"] == "budget_exhausted" and found["info"]["unet_calls"] <= 8
    report = json.loads((out / "prune" / "report.json").read_text())
    assert len(report["layers"]) == 16 and report["params"]["resolution"] == [PX, PX]
    attack = json.loads((out / "attack" / "report.json").read_text())
    assert attack["resolution"] == [PX, PX] and attack["targets"] == 1
    assert (out / "finetune-lora" / "model" / "model_index.json").is_file()
    assert json.loads((out / "scan" / "summary.json").read_text())["generations"] == 2
    assert (out / "solidmark" / "summary.json").is_file()
