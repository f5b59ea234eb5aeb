"""The cross-attention probe: same output as the stock processors, probabilities that sum to one, always restored."""

from __future__ import annotations

import pytest
import torch
from pipeline_mixin import hook_state

from diffmem.hooks.attention import cross_attention_layers, cross_attention_probes
from diffmem.tiny import TinySDConfig, build_components


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def unet(request):
    return build_components(TinySDConfig(variant=request.param), seed=0)["unet"]


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 77, 32, generator=g)


def test_forward_order_and_same_output(unet):
    names = cross_attention_layers(unet)
    parts = [n.split(".")[0] for n in names]
    assert parts == sorted(parts, key=["down_blocks", "mid_block", "up_blocks"].index)
    x, t, e = _inputs()
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
        rows = []
        with cross_attention_probes(unet, record=lambda n, p: rows.append((n, p))):
            out = unet(x, t, encoder_hidden_states=e).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in rows] == names  # every layer, in forward order
    for _, p in rows:
        torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)))


def test_logits_callback_changes_the_output_and_processors_come_back(unet):
    before = hook_state_of(unet)
    x, t, e = _inputs()

    def boost_bos(name, scores):
        scores = scores.clone()
        scores[..., 0] += 5.0
        return scores

    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=e).sample
        with pytest.raises(RuntimeError, match="inside"):
            with cross_attention_probes(unet, logits=boost_bos):
                changed = unet(x, t, encoder_hidden_states=e).sample
                raise RuntimeError("inside")
    assert (changed - ref).abs().max() > 1e-4
    assert hook_state_of(unet) == before
    with pytest.raises(ValueError, match="no cross-attention layer named 'nope'"):
        with cross_attention_probes(unet, ["nope"]):
            pass


def hook_state_of(unet):
    class Holder:
        components = {"unet": unet}

    return hook_state(Holder)
