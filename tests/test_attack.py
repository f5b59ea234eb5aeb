"""The Finding Dori attack: the right target per prediction type, loss goes down, the model stays untouched."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.attack.dori import (
    DoriConfig,
    denoising_loss,
    denoising_target,
    dori_search,
    encode_images,
    encode_prompts,
)
from diffmem.seeding import item_generator


def _pipe(path):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


def test_target_follows_the_prediction_type(tiny_sd1_dir, tiny_sd2_dir):
    z, eps, t = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.tensor([10, 900])
    sd1, sd2 = _pipe(tiny_sd1_dir).scheduler, _pipe(tiny_sd2_dir).scheduler
    assert torch.equal(denoising_target(sd1, z, eps, t), eps)
    abar = sd2.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * z
    torch.testing.assert_close(denoising_target(sd2, z, eps, t), v)


def test_attack_lowers_the_denoising_loss_and_leaves_the_model_alone(tiny_sd_dir):
    pipe = _pipe(tiny_sd_dir)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)  # 8x8 latents keep the test fast
    latents = encode_images(pipe.vae, image)
    init = encode_prompts(pipe, ["a photo of a red cat"])
    pipe.unet.requires_grad_(True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    config = DoriConfig(steps=5, batch_size=4, eval_pairs=8, lr=0.1)
    result = dori_search(pipe.unet, pipe.scheduler, latents, init, config, key=("x",))
    assert result.final_loss < result.initial_loss
    assert result.embeds.shape == init.shape and not torch.equal(result.embeds, init)
    assert len(result.losses) == 5
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert all(p.requires_grad for p in pipe.unet.parameters()) and all(
        p.grad is None for p in pipe.unet.parameters()
    )
    # the loss reported is the loss of the embedding returned, on the fixed evaluation pairs
    eval_gen = item_generator(0, "dori-eval", "x")
    noise = torch.randn((8, *latents.shape[1:]), generator=eval_gen)
    t = torch.linspace(1, pipe.scheduler.config.num_train_timesteps - 1, 8).round().long()
    with torch.no_grad():
        again = denoising_loss(pipe.unet, pipe.scheduler, latents, result.embeds, noise, t)
    assert float(again) == pytest.approx(result.final_loss, rel=1e-5)
    # same seed and key: same trigger; an L2 ball bounds the change of every token
    bounded = dori_search(
        pipe.unet,
        pipe.scheduler,
        latents,
        init,
        DoriConfig(steps=2, batch_size=2, eval_pairs=2, eps_ball=0.05),
    )
    assert float((bounded.embeds - init).norm(dim=-1).max()) <= 0.05 + 1e-5


@pytest.mark.slow
def test_attack_cli_under_an_edit_and_resume(tiny_sd1_dir, tmp_path, capsys):
    from PIL import Image

    from diffmem.cli import main
    from diffmem.edits import WeightMask
    from diffmem.fingerprint import model_fingerprint
    from diffmem.hooks.ffn import ffn_layers

    pipe = _pipe(tiny_sd1_dir)
    layers = ffn_layers(pipe.unet)
    mask = WeightMask(
        {n: torch.ones_like(m.weight, dtype=torch.bool) for n, m in layers.items()},
        model_fingerprint(pipe.unet),
    )
    mask.save(tmp_path / "mask.safetensors")
    rng = torch.Generator().manual_seed(3)
    for i in range(2):
        arr = (torch.rand(32, 32, 3, generator=rng) * 255).byte().numpy()
        Image.fromarray(arr).save(tmp_path / f"img{i}.png")
    (tmp_path / "targets.jsonl").write_text(
        '{"id": "a", "caption": "a <b>red</b> cat", "file_name": "img0.png"}\n'
        '{"id": "b", "caption": "a blue dog", "file_name": "img1.png"}\n'
    )
    out = tmp_path / "out"
    argv = [
        "attack",
        "--model",
        str(tiny_sd1_dir),
        "--targets",
        str(tmp_path / "targets.jsonl"),
        "--out",
        str(out),
    ]
    argv += ["--steps", "2", "--batch-size", "2", "--seeds", "1", "--gen-steps", "2", "--device", "cpu"]
    argv += ["--mask", str(tmp_path / "mask.safetensors")]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["targets"] == 2 and 0 <= report["replication_rate_after"] <= 1
    low, high = report["replication_rate_after_ci"]
    assert 0 <= low <= report["replication_rate_after"] <= high <= 1 and "mean SSIM" in report["criterion"]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    html = (out / "report.html").read_text()
    assert "<b>red</b>" not in html and "&lt;b&gt;red&lt;/b&gt;" in html
    # the run did not leave the model pruned on disk, and a rerun resumes (nothing left to attack)
    stamp = (out / "triggers.safetensors").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "triggers.safetensors").stat().st_mtime_ns == stamp
    assert (
        json.loads((out / "report.json").read_text())["similarity_after_mean"]
        == report["similarity_after_mean"]
    )
    capsys.readouterr()
    # a mask of another model is refused with a message
    WeightMask(mask.masks, "0" * 16).save(tmp_path / "other.safetensors")
    bad = argv[:-1] + [str(tmp_path / "other.safetensors"), "--out", str(tmp_path / "out2")]
    assert main(bad) == 2
    assert "fingerprint" in capsys.readouterr().err


def _counting_checkpoint(monkeypatch) -> list[int]:
    """Count the calls of ``torch.utils.checkpoint.checkpoint`` (what diffusers' checkpointed blocks call)."""
    import torch.utils.checkpoint

    calls, original = [0], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    return calls


def test_gradient_checkpointing_gives_the_same_search_and_is_restored(tiny_sd1_dir, monkeypatch):
    pipe = _pipe(tiny_sd1_dir)
    latents = encode_images(pipe.vae, torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    init = encode_prompts(pipe, ["a photo of a red cat"])
    calls = _counting_checkpoint(monkeypatch)
    runs = {}
    for on in (False, True):
        calls[0] = 0
        config = DoriConfig(steps=4, batch_size=2, eval_pairs=2, gradient_checkpointing=on)
        runs[on] = dori_search(pipe.unet, pipe.scheduler, latents, init, config)
        # the UNet is frozen and in eval mode, yet its blocks recompute in the backward pass
        assert (calls[0] > 0) == on
        assert not pipe.unet.is_gradient_checkpointing
    assert runs[True].losses == pytest.approx(runs[False].losses, abs=1e-5)
    assert runs[True].final_loss == pytest.approx(runs[False].final_loss, abs=1e-5)
    torch.testing.assert_close(runs[True].embeds, runs[False].embeds, rtol=0, atol=1e-5)
    # a UNet that had it on keeps it on, whatever the setting
    pipe.unet.enable_gradient_checkpointing()
    for on in (False, True):
        config = DoriConfig(steps=1, batch_size=1, eval_pairs=1, gradient_checkpointing=on)
        dori_search(pipe.unet, pipe.scheduler, latents, init, config)
        assert pipe.unet.is_gradient_checkpointing


CAPTION = "a photo of a red cat"


@pytest.mark.parametrize("dtype16", [torch.bfloat16, torch.float16])
def test_attack_in_half_precision_is_close_to_float32(tiny_sd1_dir, dtype16):
    from diffusers import StableDiffusionPipeline

    from diffmem.attack.dori import attack_target

    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    config = DoriConfig(steps=5, batch_size=4, eval_pairs=8, lr=0.1)
    runs = {}
    for dtype in (torch.float32, dtype16):
        pipe = StableDiffusionPipeline.from_pretrained(
            tiny_sd1_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)
        out = attack_target(pipe, "x", CAPTION, image, config, seeds=(0,), num_inference_steps=2)
        assert pipe.unet.dtype == dtype and out.embeds.dtype == torch.float32  # y and Adam stay float32
        assert out.final_loss < out.initial_loss
        runs[dtype] = out, encode_prompts(pipe, [CAPTION]).float()
    (full, full_init), (half, half_init) = runs[torch.float32], runs[dtype16]
    # observed on the tiny model (bfloat16 and float16 alike): losses within 3e-4 (relative), their
    # drops within 3 %, the moves of the embedding at cosine 0.997 with a 7 % relative difference
    assert half.initial_loss == pytest.approx(full.initial_loss, rel=2e-3)
    assert half.final_loss == pytest.approx(full.final_loss, rel=2e-3)
    drop_full, drop_half = full.initial_loss - full.final_loss, half.initial_loss - half.final_loss
    assert 0.8 < drop_half / drop_full < 1.25
    move_full, move_half = (full.embeds - full_init).flatten(), (half.embeds - half_init).flatten()
    assert float(torch.nn.functional.cosine_similarity(move_full, move_half, dim=0)) > 0.98
    assert float((move_half - move_full).norm() / move_full.norm()) < 0.2
    assert all(-1 <= s <= 1 for s in half.similarity_before + half.similarity_after)  # SSIM, finite
