"""``NeuronSet``: value-projection neurons found for one prompt or a set of prompts, saved as JSON.

A neuron is an output channel of a cross-attention value projection (``...attn2.to_v``), named by the
module's name in the UNet and its channel index. The set carries the fingerprint of the model it was
found on (:func:`diffmem.fingerprint.model_fingerprint`) and is refused on any other model. ``save(x.json)``
(what ``diffmem localize`` writes) and ``save_pretrained(folder)`` both write one JSON config
(:class:`diffmem.saved.SavedObject`); the format-1 JSON files and edit folders still load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffmem.edits.base import LEGACY_EDIT_FORMAT, Edit
from diffmem.fingerprint import FingerprintMismatchError, check_fingerprint

__all__ = ["FORMAT", "FingerprintMismatchError", "NeuronSet"]

FORMAT = "diffmem.NeuronSet/1"


@dataclass
class NeuronSet(Edit):
    """Neurons per value layer, with the prompts they were found for and the memorization scores.

    ``layers``: module names of the value projections (all searched layers, possibly with empty lists);
    ``neurons``: one sorted list of channel indices per layer; ``prompts``, ``score_before`` and
    ``score_after`` are aligned (one entry per prompt; the union keeps every prompt's); ``info`` holds
    method details (threshold, initial candidates, ...).
    """

    fingerprint: str
    layers: list[str]
    neurons: list[list[int]]
    prompts: list[str] = field(default_factory=list)
    score_before: list[float | None] = field(default_factory=list)
    score_after: list[float | None] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.neurons):
            raise ValueError(
                f"NeuronSet: {len(self.layers)} layer names but {len(self.neurons)} neuron lists"
            )
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("NeuronSet: a layer name appears twice")
        self.neurons = [sorted({int(i) for i in idx}) for idx in self.neurons]
        for name, idx in zip(self.layers, self.neurons):
            if idx and idx[0] < 0:
                raise ValueError(f"NeuronSet: negative neuron index {idx[0]} in layer {name}")
        n = len(self.prompts)
        for key in ("score_before", "score_after"):
            values = getattr(self, key)
            if not values and n:
                setattr(self, key, [None] * n)
            elif len(values) != n:
                raise ValueError(f"NeuronSet: {len(values)} values in {key} for {n} prompt(s)")

    # ----------------------------------------------------------------------------------- queries
    def __len__(self) -> int:
        return sum(len(idx) for idx in self.neurons)

    def items(self) -> list[tuple[str, int]]:
        """All ``(layer name, neuron index)`` pairs."""
        return [(name, i) for name, idx in zip(self.layers, self.neurons) for i in idx]

    def by_layer(self) -> dict[str, list[int]]:
        """Layer name -> indices, non-empty layers only."""
        return {name: idx for name, idx in zip(self.layers, self.neurons) if idx}

    @classmethod
    def empty(cls, fingerprint: str, layers: list[str], **kwargs: Any) -> NeuronSet:
        return cls(fingerprint=fingerprint, layers=list(layers), neurons=[[] for _ in layers], **kwargs)

    # ----------------------------------------------------------------------------------- algebra
    def union(self, *others: NeuronSet) -> NeuronSet:
        """Neurons of all sets together (same model required); prompts and scores are concatenated."""
        layers = list(self.layers)
        merged = {name: set(idx) for name, idx in zip(self.layers, self.neurons)}
        prompts, before, after = list(self.prompts), list(self.score_before), list(self.score_after)
        for other in others:
            if other.fingerprint != self.fingerprint:
                raise FingerprintMismatchError(
                    f"cannot unite NeuronSets of different models ({self.fingerprint} and {other.fingerprint})"
                )
            for name, idx in zip(other.layers, other.neurons):
                if name not in merged:
                    layers.append(name)
                    merged[name] = set()
                merged[name].update(idx)
            prompts += other.prompts
            before += other.score_before
            after += other.score_after
        return NeuronSet(
            fingerprint=self.fingerprint,
            layers=layers,
            neurons=[sorted(merged[name]) for name in layers],
            prompts=prompts,
            score_before=before,
            score_after=after,
            info={"union_of": 1 + len(others)},
        )

    # ----------------------------------------------------------------------------------- checks
    def validate(self, unet: nn.Module) -> dict[str, nn.Linear]:
        """Check the set fits ``unet``: same fingerprint, layers exist and are Linear, indices in range.

        Returns name -> module for the layers that hold neurons. Raises
        :class:`FingerprintMismatchError` or ``ValueError`` with the layer and index at fault.
        """

        check_fingerprint(self.fingerprint, unet, "this NeuronSet", "localize the neurons on this model")
        modules = dict(unet.named_modules())
        resolved: dict[str, nn.Linear] = {}
        for name, idx in self.by_layer().items():
            module = modules.get(name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"NeuronSet: layer {name!r} is not a Linear module of this UNet")
            if idx[-1] >= module.out_features:
                raise ValueError(
                    f"NeuronSet: neuron index {idx[-1]} out of range for layer {name} "
                    f"({module.out_features} output channels, expected 0..{module.out_features - 1})"
                )
            resolved[name] = module
        return resolved

    def scales(self, unet: nn.Module, factor: float = 0.0) -> dict[str, torch.Tensor]:
        """Layer name -> per-channel multiplier (``factor`` at the set's neurons, 1 elsewhere); validates first."""
        out = {}
        for name, module in self.validate(unet).items():
            scale = torch.ones(module.out_features)
            scale[self.by_layer()[name]] = factor
            out[name] = scale
        return out

    def weight_multipliers(self, unet: nn.Module, factor: float = 0.0) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> multiplier that scales the set's rows of ``to_v.weight`` (and bias) by ``factor``.

        Refuses attention layers whose projections were fused (``fuse_qkv_projections``): there the
        value rows live in ``to_kv``/``to_qkv`` and editing ``to_v`` would silently do nothing.
        """
        modules = dict(unet.named_modules())
        out: dict[torch.Tensor, torch.Tensor] = {}
        for name, scale in self.scales(unet, factor).items():
            parent = modules.get(name.rsplit(".", 1)[0]) if "." in name else None
            if getattr(parent, "fused_projections", False):
                raise ValueError(
                    f"the attention of {name} has fused projections; call unet.unfuse_qkv_projections() first"
                )
            layer = modules[name]
            out[layer.weight] = scale.view(-1, 1)
            if layer.bias is not None:
                out[layer.bias] = scale
        return out

    # ----------------------------------------------------------------------------------- dictionaries
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "n_neurons": len(self),
            "layers": self.layers,
            "neurons": self.neurons,
            "prompts": self.prompts,
            "score_before": self.score_before,
            "score_after": self.score_after,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "NeuronSet") -> NeuronSet:
        """The set from :meth:`to_dict`'s dictionary (a format-1 JSON file holds exactly that)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f'{source}: not a diffmem NeuronSet (expected "format": "{FORMAT}")')
        return cls._from_fields(data, source)

    @classmethod
    def _from_fields(cls, data: dict[str, Any], source: str) -> NeuronSet:
        missing = [k for k in ("fingerprint", "layers", "neurons") if k not in data]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
        try:
            return cls(
                fingerprint=str(data["fingerprint"]),
                layers=[str(x) for x in data["layers"]],
                neurons=[[int(i) for i in idx] for idx in data["neurons"]],
                prompts=[str(p) for p in data.get("prompts", [])],
                score_before=list(data.get("score_before", [])),
                score_after=list(data.get("score_after", [])),
                info=dict(data.get("info", {})),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: {err}") from err

    # ----------------------------------------------------------------------------------- files
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Everything in the JSON config (the neurons are short index lists): no tensors."""
        return {k: v for k, v in self.to_dict().items() if k != "format"}, {}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> NeuronSet:
        return cls._from_fields(config, source)

    @classmethod
    def _from_legacy(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> NeuronSet:
        """Format 1: ``diffmem localize``'s JSON file (:meth:`to_dict`), or an edit folder with the
        indices in ``edit.safetensors``."""
        if config.get("format") == LEGACY_EDIT_FORMAT:
            layers = config.get("layers")
            if not isinstance(layers, list) or any(name not in tensors for name in layers):
                raise ValueError(
                    f"{source}: the config's layers and the tensors of {cls.weights_name} do not match"
                )
            return cls._from_fields(
                {**config, "neurons": [tensors[name].tolist() for name in layers]}, source
            )
        return cls.from_dict(config, source)
