"""Whole layer groups zeroed (``diffmem.organism.ceiling``): the groups, the zeroing and its restoration."""

from __future__ import annotations

import torch
from torch import nn

from diffmem.organism.ceiling import zeroed_group_rows, zeroing_groups
from diffmem.tiny import TinySDConfig, build_tiny_pipeline


def _unet():
    return build_tiny_pipeline(TinySDConfig(variant="sd1"), seed=0).unet


def test_groups_name_every_ffn_layer_and_each_attention_projection():
    unet = _unet()
    names = [n for n, m in unet.named_modules() if isinstance(m, nn.Linear)]
    ffn = [n for n in names if n.endswith(".ff.net.2")]
    groups = zeroing_groups(unet)
    assert ffn and groups["nothing (unedited)"] == []
    assert groups["every FFN second linear layer"] == ffn
    alone = [g for g in groups if g.startswith("FFN ") and g.endswith(" alone")]
    assert [groups[g] for g in alone] == [[n] for n in ffn]
    values = groups["every cross-attention value projection"]
    assert values and all(n.endswith("attn2.to_v") for n in values)
    assert len(values) == len(ffn)  # one cross-attention per transformer block
    assert len(groups) == 2 + len(ffn) + 4


def test_rows_measure_with_the_group_zeroed_and_restore_the_weights():
    unet = _unet()
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    groups = {"nothing": [], "values": zeroing_groups(unet)["every cross-attention value projection"]}
    modules = dict(unet.named_modules())
    seen = {}

    def measure():
        zeroed = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not m.weight.any()]
        return {"zeroed": zeroed}

    for row in zeroed_group_rows(unet, groups, measure):
        seen[row["group"]] = row
    assert seen["nothing"] == {"group": "nothing", "layers": 0, "weights": 0, "zeroed": []}
    values = groups["values"]
    assert seen["values"]["zeroed"] == values and seen["values"]["layers"] == len(values)
    assert seen["values"]["weights"] == sum(modules[n].weight.numel() for n in values)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())
