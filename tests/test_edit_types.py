"""The edit types under the one edit tester mixin."""

from __future__ import annotations

import torch
from edit_mixin import EditTesterMixin

from diffmem.edits import NeuronSet, WeightMask
from diffmem.fingerprint import model_fingerprint
from diffmem.hooks.ffn import ffn_layers
from diffmem.hooks.neurons import value_layers


class TestNeuronSet(EditTesterMixin):
    def make_edit(self, unet):
        names = list(value_layers(unet))
        return NeuronSet(model_fingerprint(unet), names, [[0, 3, 7]] + [[] for _ in names[1:]], prompts=["x"])


class TestWeightMask(EditTesterMixin):
    def make_edit(self, unet):
        layers = ffn_layers(unet, ("down", "mid", "up"))
        gen = torch.Generator().manual_seed(0)
        masks = {name: torch.rand(layer.weight.shape, generator=gen) < 0.3 for name, layer in layers.items()}
        return WeightMask(masks, model_fingerprint(unet), {"method": "planted"})
