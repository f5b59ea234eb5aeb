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
    from diffmem.hooks.ffn import ffn_layers
    from diffmem.localize.prune import WeightMask
    from diffmem.modelio import model_fingerprint

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
