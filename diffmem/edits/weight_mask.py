"""``WeightMask``: single weights of feed-forward layers switched off (subspace pruning's edit).

Saved as one safetensors file (``save``: bool masks, the config JSON in the metadata; ``diffmem prune``
writes it) or as an edit folder (``save_pretrained``), by :class:`diffmem.saved.SavedObject`: no pickle.
The format-1 files (settings as separate metadata strings) and edit folders still load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from diffmem.edits.base import LEGACY_EDIT_FORMAT, Edit
from diffmem.fingerprint import FingerprintMismatchError, check_fingerprint

FORMAT = "diffmem.weight_mask/1"


@dataclass
class WeightMask(Edit):
    """Which weights of which layers are pruned: ``masks[layer]`` is bool ``[d_out, d_in]``, True = zeroed.

    Layer names are module names in the UNet, e.g.
    ``up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2``; ``fingerprint`` ties the mask to the
    model it was found on (:func:`diffmem.fingerprint.model_fingerprint`, unchanged by the edit itself).
    It is an edit in the sense of :mod:`diffmem.edits` (``validate``, ``weight_multipliers``,
    ``to_dict``), so ``diffmem.edits.applied`` / ``apply_permanently`` / ``save_edited`` take it like a
    ``NeuronSet``.
    """

    masks: dict[str, torch.Tensor]
    fingerprint: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def pruned_fraction(self) -> dict[str, float]:
        """Fraction of each layer's weights that the mask zeroes."""
        return {name: float(m.float().mean()) for name, m in self.masks.items()}

    def num_pruned(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def num_weights(self) -> int:
        return int(sum(m.numel() for m in self.masks.values()))

    def union(self, other: WeightMask) -> WeightMask:
        """The element-wise OR of two masks (same model required)."""
        if self.fingerprint and other.fingerprint and self.fingerprint != other.fingerprint:
            raise FingerprintMismatchError(
                f"cannot unite WeightMasks of different models ({self.fingerprint} and {other.fingerprint})"
            )
        masks = {n: m.clone() for n, m in self.masks.items()}
        for n, m in other.masks.items():
            masks[n] = masks[n] | m if n in masks else m.clone()
        return WeightMask(
            masks, self.fingerprint or other.fingerprint, {"union_of": [self.params, other.params]}
        )

    # ----------------------------------------------------------------------------------- the edit protocol
    def validate(self, unet: nn.Module) -> dict[str, nn.Linear]:
        """Check the mask fits ``unet`` (fingerprint, layer names, shapes); returns name -> layer.

        Raises :class:`~diffmem.fingerprint.FingerprintMismatchError` for another model and
        ``ValueError`` naming the layer for a missing layer or a shape mismatch.
        """
        check_fingerprint(self.fingerprint, unet, "this WeightMask", "run diffmem prune on this model")
        modules = dict(unet.named_modules())
        layers = {}
        for name, mask in self.masks.items():
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"WeightMask: the model has no linear layer {name!r}")
            if tuple(layer.weight.shape) != tuple(mask.shape):
                raise ValueError(
                    f"WeightMask: layer {name} has weight {tuple(layer.weight.shape)}, the mask {tuple(mask.shape)}"
                )
            layers[name] = layer
        return layers

    def weight_multipliers(self, unet: nn.Module, factor: float = 0.0) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> multiplier: ``factor`` at masked weights (0 = pruned), 1 elsewhere; biases untouched."""
        out: dict[torch.Tensor, torch.Tensor] = {}
        for name, layer in self.validate(unet).items():
            mask = self.masks[name].to(layer.weight.device)
            out[layer.weight] = torch.where(mask, torch.tensor(float(factor)), torch.tensor(1.0)).to(
                layer.weight.dtype
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON summary (the masks themselves are saved as tensors, :meth:`save`)."""
        return {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "num_pruned": self.num_pruned(),
            "num_weights": self.num_weights(),
            "pruned_fraction": self.pruned_fraction(),
            "params": self.params,
        }

    # ----------------------------------------------------------------------------------- files
    def _parts(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"fingerprint": self.fingerprint, "params": self.params, "layers": list(self.masks)}
        return config, {n: m.detach().cpu().bool() for n, m in self.masks.items()}

    @classmethod
    def _from_parts(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str) -> WeightMask:
        layers = config.get("layers", list(tensors))
        missing = [name for name in layers if name not in tensors]
        if missing:
            raise ValueError(f"{source}: no mask for layer(s) {', '.join(missing)} among its tensors")
        masks = {name: tensors[name].bool() for name in layers}
        return cls(masks, config.get("fingerprint") or None, dict(config.get("params") or {}))

    @classmethod
    def _from_legacy(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor], source: str
    ) -> WeightMask:
        """Format 1: ``diffmem prune``'s .safetensors (settings as metadata strings) or an edit folder."""
        if config.get("format") == LEGACY_EDIT_FORMAT:
            return cls._from_parts(config, tensors, source)
        if config.get("format") != FORMAT:
            raise ValueError(f"{source}: not a diffmem WeightMask (format {config.get('format')!r})")
        try:
            params = json.loads(config.get("params", "{}"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{source}: its params metadata is not valid JSON ({err})") from None
        return cls({k: t.bool() for k, t in tensors.items()}, config.get("fingerprint") or None, params)
