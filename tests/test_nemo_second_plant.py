"""NeMo with its defaults on a second planted model, built without ``test_nemo``'s construction.

Here the text encoder is a lookup table (``planted.LookupTextEncoder``) in which only the trigger word
has a nonzero coordinate ``D``; no key or value row of any cross-attention layer reads ``D`` except the
planted value neuron(s), whose head attends evenly to all 77 tokens (its query rows are zero) and whose
``to_out`` column writes one large vector into the residual stream. So the trigger reaches the UNet
through the planted neurons and nothing else: with them off the trigger prompt is an ordinary prompt.
``conv_out`` is scaled so that the planted pattern dominates the first-step noise prediction.

* one neuron: ``down_blocks.1.attentions.0`` channel 13;
* two jointly needed neurons: that one and ``mid_block`` channel 40, writing the same vector, so that
  either alone still carries the trigger.

On this model NeMo's criterion cannot be met (the same-seed similarity with the trigger's neurons off
stays near 0.36 against a threshold near 0.20 calibrated on ordinary prompts: the floor described in
``docs/nemo.md``), which is what the early exit misreads; the search must still find the neurons.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from planted import LookupTextEncoder

from diffmem.localize.nemo import NeMo, NemoConfig
from diffmem.localize.stats import compute_value_stats
from diffmem.tiny import TinySDConfig, build_components

WORD, COORD = "zebra", 7
FIRST = ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 13)
SECOND = ("mid_block.attentions.0.transformer_blocks.0.attn2.to_v", 40)
ORDINARY = [
    "a photo of a dog",
    "a red car",
    "two cats on a sofa",
    "a house by the lake",
    "a bowl of fruit",
    "a man riding a bike",
    "an old tree in the snow",
    "a plate of pasta",
    "a sailing boat at sunset",
    "children playing football",
    "a city street at night",
    "a blue vase with flowers",
]
PROMPT = f"a photo of a {WORD}"


def _planted_model(plants, gain: float = 3e5, conv_scale: float = 10.0) -> dict:
    c = build_components(TinySDConfig(variant="sd1"), seed=1)
    ids = c["tokenizer"](WORD).input_ids[1:-1]
    assert len(ids) == 1
    g = torch.Generator().manual_seed(11)
    table = torch.randn(49408, c["text_encoder"].config.hidden_size, generator=g)
    table[:, COORD] = 0
    table[ids[0], COORD] = 1.0
    c["text_encoder"] = LookupTextEncoder(table)
    unet = c["unet"]
    vector = torch.randn(1024, generator=g) * 3.0
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_v.weight[:, COORD] = 0
                module.to_k.weight[:, COORD] = 0
        for layer, channel in plants:
            to_v = unet.get_submodule(layer)
            attn = unet.get_submodule(layer.rsplit(".", 1)[0])
            width = to_v.out_features // attn.heads
            head = slice(channel // width * width, (channel // width + 1) * width)
            attn.to_q.weight[head] = 0
            to_v.weight[channel] = 0
            to_v.weight[channel, COORD] = gain
            out = attn.to_out[0].weight
            out[:, channel] = vector[: out.shape[0]]
        unet.conv_out.weight *= conv_scale
        unet.conv_out.bias *= conv_scale
    return c


def _nemo(plants, **config) -> NeMo:
    c = _planted_model(plants)
    stats = compute_value_stats(c["unet"], c["text_encoder"], c["tokenizer"], ORDINARY, progress=False)
    args = (c["unet"], c["scheduler"], c["text_encoder"], c["tokenizer"], stats)
    found = NeMo(*args, NemoConfig()).threshold_calibration(ORDINARY)
    return NeMo(*args, NemoConfig(threshold=found["threshold"], threshold_spread=found["std"], **config))


def _scores(nemo: NeMo, sets) -> list[float]:
    probe = nemo.probe(PROMPT)
    masks = [
        probe.mask_from_lists([[ch for name, ch in chosen if name == layer] for layer in nemo.layers])
        for chosen in sets
    ]
    return probe.scores(torch.stack(masks)).tolist()


@pytest.fixture(scope="module")
def one():
    return _nemo([FIRST])


@pytest.fixture(scope="module")
def two():
    return _nemo([FIRST, SECOND])


def test_one_planted_neuron_is_found_with_the_defaults(one):
    tau = one.config.threshold
    every = [(name, ch) for name, layer in one.layers.items() for ch in range(layer.out_features)]
    planted_off, everything_off = _scores(one, [[FIRST], every])
    assert everything_off > tau and planted_off > tau  # the floor: the criterion cannot be met here
    found = one.localize(PROMPT)
    assert found.info["memorized"] and found.score_before[0] > tau + 0.3
    assert found.items() == [FIRST]  # exactly the planted neuron, nothing else
    assert found.info["outcome"] == "not_localizable" and found.info["margin"] > one.config.threshold_spread
    assert found.score_after[0] == pytest.approx(planted_off, abs=1e-4)
    # the early-exit heuristic (opt-in) skips this prompt: every neuron off stays above the threshold
    args = (one.unet, one.scheduler, one.text_encoder, one.tokenizer, one.stats)
    skipped = NeMo(*args, replace(one.config, early_exit=True)).localize(PROMPT)
    assert skipped.info["outcome"] == "not_localizable" and len(skipped) == 0
    assert skipped.info["unet_calls"] == 2 and skipped.info["all_off_score"] == pytest.approx(
        everything_off, abs=1e-4
    )
    assert not one.localize("a photo of a horse").info["memorized"]


def test_two_jointly_needed_neurons_are_found_with_the_defaults(two):
    both, first, second = _scores(two, [[FIRST, SECOND], [FIRST], [SECOND]])
    assert min(first, second) > both + 0.3  # either one alone still carries the trigger
    found = two.localize(PROMPT)
    assert found.info["memorized"]
    assert FIRST in found.items() and SECOND in found.items()
    assert len(found) <= 5, found.items()
    assert found.score_after[0] <= both + 0.01
