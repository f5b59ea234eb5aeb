"""NeMo neuron blocking as an inference-time mitigation (Hintersdorf et al., NeurIPS 2024).

For every flagged image the cross-attention value neurons of a :class:`~diffmem.edits.NeuronSet`
are switched off, on both guidance branches and at every step, by per-sample forward hooks on the
value projections; the other images of the batch run with every neuron on. The set is either given
(one set for every flagged prompt, e.g. the union over a memorized set) or found by NeMo for each
flagged prompt from activation statistics of non-memorized prompts; found sets are cached on this
object by model and prompt, so a prompt is localized once.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from diffmem.edits import NeuronSet
from diffmem.fingerprint import model_fingerprint
from diffmem.hooks.neurons import scaled_value_neurons
from diffmem.localize.nemo import NeMo, NemoConfig
from diffmem.localize.stats import ValueStats
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation

__all__ = ["NeMoMitigation"]


@register_mitigation
class NeMoMitigation(Mitigation):
    """Switch off memorization neurons for the flagged images.

    Args:
        neuron_set: a ``NeuronSet`` (or a path: folder, ``.json``) used for every flagged prompt; it
            is checked against the model on every call, flagged images or not.
        stats: ``ValueStats`` (or a path) of non-memorized prompts, to localize each flagged prompt
            when no ``neuron_set`` is given.
        config: ``NemoConfig`` of the localization (default: NeMo's; recalibrate ``threshold`` for
            any model but SD-1.4).
        factor: what blocked neurons are multiplied by (0: off).
    """

    name = "nemo"
    kind = "neurons"

    def __init__(self, neuron_set=None, stats=None, config=None, factor: float = 0.0):

        if isinstance(neuron_set, (str, os.PathLike)):
            neuron_set = NeuronSet.from_pretrained(neuron_set)
        if isinstance(stats, (str, os.PathLike)):
            stats = ValueStats.load(stats)
        if neuron_set is None and stats is None:
            raise ValueError(
                "mitigation 'nemo' needs neuron_set= (a NeuronSet) or stats= (ValueStats of non-memorized "
                "prompts, to localize each flagged prompt)"
            )
        self.neuron_set = neuron_set
        self.stats = stats
        self.nemo_config = config or NemoConfig()
        self.factor = float(factor)
        self._found: dict[tuple[str, str], Any] = {}

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "neuron_set": None if self.neuron_set is None else len(self.neuron_set),
            "localize": self.neuron_set is None,
            "factor": self.factor,
        }

    def neurons_for(self, pipe, prompt: str | None):
        """The set used for ``prompt``: the given one, or NeMo's localization (cached)."""
        if self.neuron_set is not None:
            return self.neuron_set
        if prompt is None:
            raise ValueError(
                "mitigation 'nemo' with prompt_embeds needs neuron_set= (localization reads the prompt)"
            )

        key = (model_fingerprint(pipe.unet), prompt)
        if key not in self._found:
            self._found[key] = NeMo.from_pipe(pipe, self.stats, self.nemo_config).localize(prompt)
        return self._found[key]

    def plan(self, batch: GuardedBatch) -> MitigationPlan:

        unet = batch.pipe.unet
        if self.neuron_set is not None:
            self.neuron_set.validate(unet)
        flagged = batch.flagged_prompts()
        if not flagged:
            return MitigationPlan()
        report: dict[int, dict[str, Any]] = {}
        per_prompt = {}
        for i, rows in flagged.items():
            start = time.perf_counter()
            per_prompt[i] = self.neurons_for(batch.pipe, batch.prompts[i])
            elapsed = time.perf_counter() - start
            for k in rows:
                report[k] = {
                    "action": self.name,
                    "neurons": len(per_prompt[i]),
                    "seconds": elapsed / len(rows),
                }
        # per-image channel scales: 1 everywhere, `factor` at the flagged images' neurons
        modules = dict(unet.named_modules())
        n = batch.num_images
        names = sorted({name for s in per_prompt.values() for name in s.by_layer()})
        scales = {name: torch.ones(n, modules[name].out_features) for name in names}
        for k, flag in enumerate(batch.flagged):
            if flag:
                for name, row in per_prompt[batch.prompt_index[k]].scales(unet, self.factor).items():
                    scales[name][k] = row
        if batch.guidance:  # the loop's batch is [negative, text]: the same mask on both halves
            scales = {name: torch.cat([s, s]) for name, s in scales.items()}
        context = scaled_value_neurons(unet, {name: modules[name] for name in names}, scales, mode="hook")
        return MitigationPlan(context=context, report=report)
