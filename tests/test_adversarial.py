"""Adversarial fine-tuning: a round runs, checkpoints, resumes to identical weights; LoRA trains and saves only adapters."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from diffmem.attack.dori import DoriConfig
from diffmem.train.adversarial import (
    AdversarialConfig,
    AdversarialTarget,
    RetainSet,
    adversarial_finetune,
    merge_lora,
)
from diffmem.train.checkpoint import list_checkpoints


def _components(seed: int = 0):
    from diffmem.tiny import TinySDConfig, build_components

    c = build_components(TinySDConfig(variant="sd1"), seed=seed)
    return c["unet"], c["scheduler"]


def _data():
    g = torch.Generator().manual_seed(0)
    # 8x8 latents and 77-token embeddings of width 32 (the tiny model's text width) keep this fast
    targets = [
        AdversarialTarget(
            id=f"t{i}",
            image_latents=torch.randn(1, 4, 8, 8, generator=g),
            surrogate_latents=torch.randn(1, 4, 8, 8, generator=g),
            caption_embeds=torch.randn(1, 77, 32, generator=g),
        )
        for i in range(2)
    ]
    retain = RetainSet(torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 32, generator=g))
    return targets, retain


CONFIG = AdversarialConfig(
    rounds=2,
    lr=1e-3,
    adv_batch_size=2,
    retain_batch_size=2,
    dori=DoriConfig(steps=1, batch_size=2, eval_pairs=1),
)


def _train(config, checkpoint_dir=None, stop_after_round=None, seed: int = 0):
    """``(unet, log)`` of a fresh tiny UNet trained on ``_data()`` (a fresh process, as far as resuming knows)."""
    targets, retain = _data()
    unet, scheduler = _components(seed)
    log = adversarial_finetune(
        unet,
        scheduler,
        targets,
        retain,
        config,
        checkpoint_dir=checkpoint_dir,
        stop_after_round=stop_after_round,
        progress=False,
    )
    return unet, log


def test_rounds_checkpoint_and_resume_to_identical_weights(tmp_path):
    start = _components()[0].state_dict()
    straight, log = _train(CONFIG, tmp_path / "a")
    assert [r["round"] for r in log.rounds] == [1, 2]
    assert all(r["adv"] > 0 and r["retain"] > 0 for r in log.rounds)
    assert any(not torch.equal(start[k], v) for k, v in straight.state_dict().items())
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["step-00000001", "step-00000002"]
    saved = list_checkpoints(tmp_path / "a")[-1]
    assert json.loads((saved / "state.json").read_text())["model_contents"] == {"unet": "full"}
    assert load_file(str(saved / "model-unet.safetensors")).keys() == straight.state_dict().keys()

    _train(CONFIG, tmp_path / "b", stop_after_round=1)
    assert len(list_checkpoints(tmp_path / "b")) == 1
    resumed, log_b = _train(CONFIG, tmp_path / "b")  # weights come back from the checkpoint
    assert [r["round"] for r in log_b.rounds] == [1, 2]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for a, b in zip(log_b.rounds, log.rounds):
        assert a == pytest.approx(b)


def test_lora_trains_only_the_adapters_and_merges(tmp_path):
    targets, retain = _data()
    unet, scheduler = _components()
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    config = AdversarialConfig(
        rounds=1,
        lr=1e-2,
        mode="lora",
        lora_rank=2,
        adv_batch_size=2,
        retain_batch_size=2,
        dori=DoriConfig(steps=1, batch_size=1, eval_pairs=1),
    )
    adversarial_finetune(unet, scheduler, targets, retain, config, progress=False)
    state = unet.state_dict()
    lora = [k for k in state if "lora_" in k]
    assert lora
    for k, v in state.items():
        if "lora_" not in k:
            assert torch.equal(v, base[k.replace(".base_layer", "")]), k
    x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        with_adapters = unet(x, t, encoder_hidden_states=y).sample
        merge_lora(unet)
        merged = unet(x, t, encoder_hidden_states=y).sample
    assert not any("lora_" in k for k in unet.state_dict())
    torch.testing.assert_close(merged, with_adapters, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(v, base[k]) for k, v in unet.state_dict().items())


LORA = dataclasses.replace(CONFIG, mode="lora", lora_rank=2, lr=1e-2)


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    straight, log = _train(LORA, tmp_path / "a")
    interrupted, _ = _train(LORA, tmp_path / "b", stop_after_round=1)
    folder = list_checkpoints(tmp_path / "b")[-1]
    assert json.loads((folder / "state.json").read_text())["model_contents"] == {"unet": "trainable"}
    saved = load_file(str(folder / "model-unet.safetensors"))
    whole = interrupted.state_dict()
    adapters = {k for k in whole if "lora_" in k}
    assert adapters and set(saved) == adapters  # every adapter tensor and nothing else
    size = (folder / "model-unet.safetensors").stat().st_size
    assert size < 0.1 * sum(v.numel() * v.element_size() for v in whole.values())

    resumed, log_b = _train(LORA, tmp_path / "b")  # the base from the model, adapters from the checkpoint
    assert [r["round"] for r in log_b.rounds] == [1, 2]
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    for a, b in zip(log_b.rounds, log.rounds):
        assert a == pytest.approx(b)
    # adapters trained on one base model are not resumed on another
    with pytest.raises(ValueError, match="another base model"):
        _train(LORA, tmp_path / "b", seed=1)


def test_gradient_checkpointing_trains_to_the_same_weights_and_is_restored(monkeypatch):
    import torch.utils.checkpoint

    targets, retain = _data()
    calls, original = [0], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    runs = {}
    for mode in ("full", "lora"):
        for on in (False, True):
            calls[0] = 0
            unet, scheduler = _components()
            config = dataclasses.replace(
                LORA if mode == "lora" else CONFIG, rounds=1, gradient_checkpointing=on
            )
            log = adversarial_finetune(unet, scheduler, targets, retain, config, progress=False)
            assert (calls[0] > 0) == on and not unet.is_gradient_checkpointing
            runs[mode, on] = log.rounds, unet.state_dict()
        (log_off, off), (log_on, on_) = runs[mode, False], runs[mode, True]
        assert log_on[0] == pytest.approx(log_off[0], abs=1e-5)
        for k, v in off.items():
            torch.testing.assert_close(on_[k], v, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_finetune_cli_lora_writes_a_model_and_resumes(tiny_sd1_dir, tmp_path, capsys):
    import json

    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from diffmem.cli import main
    from diffmem.edits import WeightMask
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.ffn import ffn_layers

    pipe = StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, safety_checker=None, requires_safety_checker=False
    )
    layers = ffn_layers(pipe.unet)
    WeightMask(
        {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()},
        model_fingerprint(pipe.unet),
    ).save(tmp_path / "mask.safetensors")
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(3):
        Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"id": f"r{i}", "caption": f"picture {i}", "file_name": f"{i}.png"}))
    (tmp_path / "targets.jsonl").write_text(rows[0] + "\n")
    (tmp_path / "retain.jsonl").write_text("\n".join(rows[1:]) + "\n")
    out = tmp_path / "out"
    argv = [
        "finetune",
        "--adversarial",
        "--model",
        str(tiny_sd1_dir),
        "--targets",
        str(tmp_path / "targets.jsonl"),
    ]
    argv += ["--retain", str(tmp_path / "retain.jsonl"), "--out", str(out), "--rounds", "1", "--lora"]
    argv += ["--attack-steps", "1", "--attack-batch-size", "1", "--surrogate-steps", "2", "--device", "cpu"]
    argv += [
        "--adv-batch-size",
        "1",
        "--retain-batch-size",
        "1",
        "--mask",
        str(tmp_path / "mask.safetensors"),
    ]
    assert main(argv) == 0
    assert "round 1/1" in capsys.readouterr().out
    tuned = StableDiffusionPipeline.from_pretrained(
        out / "model", safety_checker=None, requires_safety_checker=False
    )
    assert not any("lora_" in k for k in tuned.unet.state_dict())
    assert json.loads((out / "train_log.json").read_text())["rounds"][0]["round"] == 1
    assert (out / "surrogates.safetensors").is_file() and (out / "report.html").is_file()
    assert main(argv) == 0  # resumes: round 1 is done, nothing is trained again
    assert "round 1/1" not in capsys.readouterr().out
    assert main(argv[:1] + argv[2:]) == 2
    assert "--adversarial" in capsys.readouterr().err


def test_eight_bit_adamw_keeps_8_bit_moments_checkpoints_them_and_resumes_exactly(tmp_path):
    """bitsandbytes' AdamW8bit: both moments of large tensors stored as uint8; an interrupted run resumes
    to the same weights."""
    pytest.importorskip("bitsandbytes")
    config = dataclasses.replace(CONFIG, optimizer="adamw8bit")
    straight, _ = _train(config, tmp_path / "a")
    optim = load_file(str(list_checkpoints(tmp_path / "a")[-1] / "optim-optimizer.safetensors"))
    moments = [v for k, v in optim.items() if k.endswith(("state1", "state2"))]
    large = [v for v in moments if v.numel() >= 4096]  # bitsandbytes keeps tensors under 4,096 in float32
    assert large and all(v.dtype == torch.uint8 for v in large)
    _train(config, tmp_path / "b", stop_after_round=1)
    resumed, _ = _train(config, tmp_path / "b")
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    plain, _ = _train(CONFIG)
    assert any(
        not torch.equal(v, plain.state_dict()[k]) for k, v in straight.state_dict().items()
    )  # it is used
    with pytest.raises(ValueError, match="--optimizer: expected one of adamw, adamw8bit, sgd, got 'lion'"):
        _train(dataclasses.replace(CONFIG, optimizer="lion"))
