"""Subspace pruning: FFN layer discovery, on-device statistics, Wanda-style selection, WeightMask as an edit."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.edits import WeightMask
from diffmem.hooks.ffn import StepCounter, ffn_layers, record_ffn_input_norms
from diffmem.localize.prune import FFNStats, collect_ffn_stats, find_weight_mask, select_memorization_weights


@pytest.fixture(scope="module")
def pipe(tiny_sd1_dir):
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(
        tiny_sd1_dir, safety_checker=None, requires_safety_checker=False
    )
    p.set_progress_bar_config(disable=True)
    return p


def test_ffn_layers_are_found_in_execution_order(pipe):
    layers = ffn_layers(pipe.unet)
    assert len(layers) == 7  # 2 down, 1 mid, 4 up transformer blocks in the tiny UNet
    order = []
    handles = [m.register_forward_pre_hook(lambda _m, _i, n=n: order.append(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            pipe.unet(torch.randn(1, 4, 16, 16), 10, encoder_hidden_states=torch.randn(1, 77, 32))
    finally:
        for h in handles:
            h.remove()
    assert order == list(layers)
    assert all(n.endswith("transformer_blocks.0.ff.net.2") for n in layers)
    with pytest.raises(ValueError, match="blocks"):
        ffn_layers(pipe.unet, ("sideways",))


def _planted_stats(layers, planted_by_step, num_steps, *, amplitude=30.0, rows=64, seed=0):
    """Feed each layer constructed inputs through the real recorder: memorized rows carry big values on planted columns."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for which in ("memorized", "reference"):
        steps = StepCounter()
        with record_ffn_input_norms(layers, steps, num_steps) as rec:
            for t in range(num_steps + 2):  # steps beyond num_steps must be ignored
                steps.index = t
                for layer in layers.values():
                    x = torch.randn(2, rows, layer.in_features, generator=g)
                    if which == "memorized":
                        x = 0.01 * x
                        for j in planted_by_step.get(t, ()):
                            x[..., j] += amplitude
                    with torch.no_grad():
                        layer(x)
        out[which] = FFNStats(rec.sumsq, 1)
    return out["memorized"], out["reference"]


def test_mask_selects_exactly_the_planted_columns(pipe):
    layers = ffn_layers(pipe.unet)
    # column 5 planted at step 0, columns 9 and 17 at step 1, column 40 at step 3 (after tau = 2)
    planted = {0: [5], 1: [9, 17], 3: [40]}
    mem, ref = _planted_stats(layers, planted, num_steps=4)
    weights = {n: m.weight for n, m in layers.items()}
    masks = select_memorization_weights(weights, mem, ref, ratio=0.05, tau=2)
    for name, mask in masks.items():
        expected = torch.zeros_like(mask)
        expected[:, [5, 9, 17]] = True
        assert torch.equal(mask, expected), name
    only_first = select_memorization_weights(weights, mem, ref, ratio=0.05, tau=1)
    assert all(m.any(0).nonzero().flatten().tolist() == [5] for m in only_first.values())
    # select_ratio 0.5 with tau 2: a weight must be selected in both steps; none is
    assert not any(
        m.any()
        for m in select_memorization_weights(weights, mem, ref, ratio=0.05, tau=2, select_ratio=0.5).values()
    )
    # top-k per row: with k = 1 each row keeps only its single best planted column
    k1 = select_memorization_weights(weights, mem, ref, ratio=1 / 256, tau=1)
    assert all(int(m.sum(1).max()) <= 1 for m in k1.values())
    # the cap keeps at most floor(fraction * size) weights per layer, all inside the uncapped mask
    capped = select_memorization_weights(weights, mem, ref, ratio=0.05, tau=2, max_layer_fraction=0.005)
    for name, m in capped.items():
        assert int(m.sum()) == int(0.005 * m.numel())
        assert not (m & ~masks[name]).any()


def test_statistics_in_the_pipeline_find_a_planted_column_and_ignore_batch_size(pipe):
    """A column pushed up in the conditional branch for memorized prompts only is what the pipeline run selects."""
    layers = ffn_layers(pipe.unet)
    name = "mid_block.attentions.0.transformer_blocks.0.ff.net.2"
    geglu = dict(pipe.unet.named_modules())[name.replace("net.2", "net.0")]
    active = {"on": False}

    def plant(_m, _i, out):
        if active["on"]:
            out = out.clone()
            out[out.shape[0] // 2 :, :, 7] += 50.0
        return out

    calls = [0]
    handle = geglu.register_forward_hook(plant)
    counter = pipe.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    prompts = ["a red square", "a blue circle", "a green star"]
    try:
        kwargs = dict(num_steps=2, num_inference_steps=4, cond_only=True, progress=False)
        active["on"] = True
        mem = collect_ffn_stats(pipe, prompts, batch_size=2, **kwargs)
        mem_one = collect_ffn_stats(pipe, prompts, batch_size=1, **kwargs)
        active["on"] = False
        ref = collect_ffn_stats(pipe, [""] * 3, batch_size=3, **kwargs)
    finally:
        handle.remove()
        counter.remove()
    # 2 + 3 + 1 pipeline calls, each interrupted after num_steps = 2 UNet calls
    assert calls[0] == 6 * 2
    for n in mem.sumsq:
        torch.testing.assert_close(mem.sumsq[n], mem_one.sumsq[n], rtol=1e-4, atol=1e-4)
    assert mem.sumsq[name].shape == (2, layers[name].in_features)
    masks = select_memorization_weights({n: m.weight for n, m in layers.items()}, mem, ref, ratio=0.01, tau=2)
    expected = torch.zeros_like(masks[name])
    expected[:, 7] = True
    assert torch.equal(masks[name], expected)


def test_weight_mask_is_an_edit_saved_without_pickle(pipe, tmp_path):
    from diffmem.edits import applied, apply_permanently, save_edited
    from diffmem.fingerprint import FingerprintMismatchError, model_fingerprint

    layers = ffn_layers(pipe.unet)
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(m.weight.shape, generator=g) < 0.1 for n, m in list(layers.items())[:3]}
    mask = WeightMask(masks, model_fingerprint(pipe.unet), {"note": "random"})
    path = mask.save(tmp_path / "mask.safetensors")
    loaded = WeightMask.load(path)
    assert loaded.fingerprint == mask.fingerprint and loaded.params == {"note": "random"}
    assert all(torch.equal(loaded.masks[n], masks[n]) for n in masks)
    assert loaded.num_pruned() == sum(int(m.sum()) for m in masks.values())
    for n, frac in loaded.pruned_fraction().items():
        assert frac == pytest.approx(float(masks[n].float().mean()))

    originals = {n: layers[n].weight.detach().clone() for n in masks}
    with applied(pipe.unet, loaded):
        for n, m in masks.items():
            w = layers[n].weight
            assert (w[m] == 0).all() and torch.equal(w[~m], originals[n][~m])
    assert all(torch.equal(layers[n].weight, originals[n]) for n in masks)
    with pytest.raises(RuntimeError), applied(pipe.unet, loaded):
        raise RuntimeError("boom")
    assert all(torch.equal(layers[n].weight, originals[n]) for n in masks)

    from diffusers import StableDiffusionPipeline

    out = save_edited(pipe, loaded, tmp_path / "pruned")
    assert all(torch.equal(layers[n].weight, originals[n]) for n in masks)
    pruned = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    pruned_layers = ffn_layers(pruned.unet)
    for n, m in masks.items():
        assert (pruned_layers[n].weight[m] == 0).all()
    from diffmem.edits import adopt_edit_record

    assert adopt_edit_record(out, pruned.unet)  # the saved edited weights keep the original's identity
    loaded.validate(pruned.unet)

    other = pipe.unet.__class__.from_config(pipe.unet.config)
    with pytest.raises(FingerprintMismatchError):
        loaded.validate(other)
    apply_permanently(other, WeightMask(masks, None))
    assert all((ffn_layers(other)[n].weight[m] == 0).all() for n, m in masks.items())

    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="--mask"):
        WeightMask.load(tmp_path / "bad.safetensors", "--mask")
    with pytest.raises(FileNotFoundError, match="--mask"):
        WeightMask.load(tmp_path / "missing.safetensors", "--mask")


def test_find_weight_mask_end_to_end_and_cli(tiny_sd1_dir, tmp_path, pipe, capsys):
    from diffmem.cli import main

    mask, mem, ref = find_weight_mask(
        pipe, ["a red square", "a cat"], tau=2, num_inference_steps=3, ratio=0.05, progress=False
    )
    assert mask.params["tau"] == 2 and set(mask.masks) == set(ffn_layers(pipe.unet))
    assert mem.num_prompts == 2 and ref.num_prompts == 2

    mem_file = tmp_path / "mem.txt"
    mem_file.write_text("a red square\n\na cat\n")
    ref_file = tmp_path / "ref.jsonl"
    ref_file.write_text('{"caption": "a dog"}\n{"caption": "a house"}\n')
    out = tmp_path / "out"
    argv = ["prune", "--model", str(tiny_sd1_dir), "--memorized", str(mem_file), "--reference", str(ref_file)]
    argv += [
        "--out",
        str(out),
        "--tau",
        "2",
        "--steps",
        "3",
        "--ratio",
        "0.05",
        "--device",
        "cpu",
        "--save-model",
    ]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["layers"]) == 7
    saved = WeightMask.load(out / "weight_mask.safetensors")
    assert report["num_pruned"] == saved.num_pruned()
    assert [r["pruned_fraction"] for r in report["layers"]] == pytest.approx(
        list(saved.pruned_fraction().values())
    )
    assert (out / "model" / "model_index.json").is_file() and (out / "report.html").is_file()
    assert "down_blocks.0" in capsys.readouterr().out

    assert (
        main(
            [
                "prune",
                "--model",
                str(tiny_sd1_dir),
                "--memorized",
                str(tmp_path / "nope.txt"),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "--memorized" in capsys.readouterr().err
