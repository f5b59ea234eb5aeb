"""Hooks and edits: neurons switched off by hooks and by weights agree, always restore, refuse wrong models."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.edits import EDIT_RECORD, NeuronSet, adopt_edit_record, applied, apply_permanently, save_edited
from diffmem.fingerprint import FingerprintMismatchError, model_fingerprint
from diffmem.hooks.neurons import (
    record_value_activations,
    scaled_value_neurons,
    value_activations,
    value_layers,
)
from diffmem.hooks.restore import HookNotFiredError
from diffmem.tiny import TinySDConfig, build_components, build_tiny_pipeline


@pytest.fixture(scope="module")
def unet():
    return build_components(TinySDConfig(variant="sd1"), seed=0)["unet"]


def _inputs(seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 16, 16, generator=g),
        torch.tensor(500),
        torch.randn(batch, 77, 32, generator=g),
    )


def _run(unet, x, t, e):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=e).sample


def _state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def _neuron_set(unet, picks: dict[int, list[int]]) -> NeuronSet:
    names = list(value_layers(unet))
    return NeuronSet(model_fingerprint(unet), names, [picks.get(i, []) for i in range(len(names))])


def test_value_layers_come_from_the_model(unet):
    names = list(value_layers(unet))
    assert names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    with_up = value_layers(unet, ("down", "mid", "up"))
    assert len(with_up) == 3 + 4 and all(n.endswith("attn2.to_v") for n in with_up)
    with pytest.raises(ValueError, match="blocks"):
        value_layers(unet, ("middle",))


def test_activations_match_recorded_forward(unet):
    layers = value_layers(unet)
    x, t, e = _inputs()
    direct = value_activations(layers, e)
    with record_value_activations(layers) as rec:
        _run(unet, x, t, e)
    for name, a in zip(layers, direct):
        assert a.shape == (2, layers[name].out_features)
        torch.testing.assert_close(rec[name][0], a)


def test_hook_and_weight_modes_agree_and_restore(unet):
    x, t, e = _inputs()
    before_state = _state(unet)
    base = _run(unet, x, t, e)
    ns = _neuron_set(unet, {0: [1, 5, 7], 2: [3]})
    with applied(unet, ns, mode="hook"):
        hooked = _run(unet, x, t, e)
    with applied(unet, ns, mode="weight"):
        weighted = _run(unet, x, t, e)
        assert unet.get_submodule(ns.layers[0]).weight[[1, 5, 7]].abs().sum() == 0
    torch.testing.assert_close(hooked, weighted, rtol=1e-5, atol=1e-6)
    assert (hooked - base).abs().max() > 1e-4  # the neurons did something
    torch.testing.assert_close(_run(unet, x, t, e), base)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    # an empty set changes nothing
    with applied(unet, _neuron_set(unet, {}), mode="weight"):
        torch.testing.assert_close(_run(unet, x, t, e), base)


def test_restores_after_an_exception(unet):
    x, t, e = _inputs()
    base = _run(unet, x, t, e)
    ns = _neuron_set(unet, {1: list(range(10))})
    for mode in ("hook", "weight"):
        with pytest.raises(RuntimeError, match="boom"):
            with applied(unet, ns, mode=mode):
                raise RuntimeError("boom")
        torch.testing.assert_close(_run(unet, x, t, e), base)


def test_per_group_masks_equal_separate_calls(unet):
    layers = value_layers(unet)
    x, t, e = _inputs(batch=2)
    name = next(iter(layers))
    d = layers[name].out_features
    masks = torch.ones(3, d)
    masks[1, :8] = 0
    masks[2, 8:16] = 0
    xs, es = x.repeat(3, 1, 1, 1), e.repeat(3, 1, 1)  # 3 groups of 2 samples each
    with scaled_value_neurons(unet, layers, {name: masks}):
        batched = _run(unet, xs, t, es)
    for g in range(3):
        with scaled_value_neurons(unet, layers, {name: masks[g]}, mode="weight"):
            single = _run(unet, x, t, e)
        torch.testing.assert_close(batched[2 * g : 2 * g + 2], single, rtol=1e-4, atol=1e-5)


def test_fused_projections_are_detected():
    unet = build_components(TinySDConfig(variant="sd1"), seed=0)["unet"]
    unet.fuse_qkv_projections()
    ns = _neuron_set(unet, {0: [2]})
    x, t, e = _inputs()
    with pytest.raises(HookNotFiredError, match="never fired"):
        with applied(unet, ns, mode="hook"):
            _run(unet, x, t, e)
    with pytest.raises(ValueError, match="fused"):
        with applied(unet, ns, mode="weight"):
            pass


def test_wrong_model_and_bad_indices_are_refused(unet):
    other = build_components(TinySDConfig(variant="sd1"), seed=1)["unet"]
    ns = _neuron_set(unet, {0: [0]})
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        with applied(other, ns):
            pass
    d = unet.get_submodule(ns.layers[0]).out_features
    bad = _neuron_set(unet, {0: [d]})
    with pytest.raises(ValueError, match=f"index {d} out of range"):
        bad.validate(unet)
    renamed = NeuronSet(ns.fingerprint, ["down_blocks.0.nope"], [[0]])
    with pytest.raises(ValueError, match="not a Linear"):
        renamed.validate(unet)


def test_neuron_set_json_roundtrip_and_union(tmp_path, unet):
    a = _neuron_set(unet, {0: [4, 1, 4]})
    a.prompts, a.score_before, a.score_after = ["p1"], [0.9], [0.2]
    b = _neuron_set(unet, {0: [2], 2: [7]})
    b.prompts, b.score_before, b.score_after = ["p2"], [0.8], [0.3]
    assert a.neurons[0] == [1, 4]  # sorted, de-duplicated
    u = a.union(b)
    assert u.by_layer() == {a.layers[0]: [1, 2, 4], a.layers[2]: [7]} and len(u) == 4
    assert u.prompts == ["p1", "p2"] and u.score_after == [0.2, 0.3]
    path = u.save(tmp_path / "u.json")
    assert NeuronSet.load(path) == u
    other = NeuronSet("0" * 16, a.layers, [[] for _ in a.layers])
    with pytest.raises(FingerprintMismatchError):
        a.union(other)
    (tmp_path / "bad.json").write_text(json.dumps({"layers": []}))
    with pytest.raises(ValueError, match="bad.json.*not a diffmem NeuronSet"):
        NeuronSet.load(tmp_path / "bad.json")


def test_permanent_edit_and_export(tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0)
    unet = pipe.unet
    ns = _neuron_set(unet, {0: [0, 3], 1: [10]})
    x, t, e = _inputs()
    base = _run(unet, x, t, e)
    with applied(unet, ns, mode="hook"):
        expected = _run(unet, x, t, e)
    out = save_edited(pipe, ns, tmp_path / "edited")
    torch.testing.assert_close(_run(unet, x, t, e), base)  # the pipeline itself is unchanged
    record = json.loads((out / EDIT_RECORD).read_text())
    assert NeuronSet.from_dict(record["edit"]) == ns
    edited = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, use_safetensors=True).unet
    assert edited.get_submodule(ns.layers[0]).weight[[0, 3]].abs().sum() == 0
    torch.testing.assert_close(_run(edited, x, t, e), expected, rtol=1e-5, atol=1e-6)
    assert adopt_edit_record(out, edited)  # exactly the saved edited weights: the original's identity
    ns.validate(edited)
    with torch.no_grad():
        edited.conv_out.weight[0, 0, 0, 0] += 1e-2  # a fine-tune of the edited copy is another model
    with pytest.raises(FingerprintMismatchError, match="not for this one"):
        ns.validate(edited)
    apply_permanently(unet, ns)
    torch.testing.assert_close(_run(unet, x, t, e), expected, rtol=1e-5, atol=1e-6)
