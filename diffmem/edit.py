"""Apply an edit found by a localization method to a UNet: at run time (always restored) or permanently.

An *edit* is any object with

* ``fingerprint`` (the model it was found on) and ``validate(unet)`` (raises on another model or
  out-of-range indices), and
* ``weight_multipliers(unet, factor) -> {parameter: multiplier}`` (multipliers broadcastable to the
  parameter: rows for a :class:`~diffmem.localize.neuron_set.NeuronSet`, single weights for an FFN
  weight mask).

Objects that can also act on module outputs (``scales(unet, factor) -> {value-layer name: [d]}``,
e.g. ``NeuronSet``) can be applied by forward hooks (``mode="hook"``). Weight mode is the default: it
works with any attention processor; hook mode leaves the weights untouched and checks that its hooks
fired. Either way the model is restored when the ``with`` block ends, even on error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from diffmem.hooks.neurons import scaled_value_neurons
from diffmem.hooks.restore import scaled_weights

#: File written beside an exported edited model, describing the edit that was applied.
EDIT_RECORD = "diffmem_edit.json"


class UNetEdit(Protocol):
    fingerprint: str

    def validate(self, unet: nn.Module) -> Any: ...

    def weight_multipliers(
        self, unet: nn.Module, factor: float = 0.0
    ) -> dict[torch.Tensor, torch.Tensor]: ...

    def to_dict(self) -> dict[str, Any]: ...


@contextlib.contextmanager
def applied(
    unet: nn.Module, edit: UNetEdit, mode: str = "weight", factor: float = 0.0
) -> Iterator[nn.Module]:
    """Context manager: ``unet`` with ``edit`` applied (its weights or outputs scaled by ``factor``, 0 = off).

    ``mode="weight"`` scales parameters in place and restores them; ``mode="hook"`` rewrites the
    value layers' outputs with forward hooks (only for edits that define ``scales``). Raises
    :class:`~diffmem.localize.neuron_set.FingerprintMismatchError` for an edit of another model.
    """
    if mode == "weight":
        with scaled_weights(edit.weight_multipliers(unet, factor)):
            yield unet
    elif mode == "hook":
        if not hasattr(edit, "scales"):
            raise ValueError(f"{type(edit).__name__} cannot be applied by hooks; use mode='weight'")
        scales = edit.scales(unet, factor)
        modules = dict(unet.named_modules())
        with scaled_value_neurons(unet, {name: modules[name] for name in scales}, scales, mode="hook"):
            yield unet
    else:
        raise ValueError(f"mode must be 'weight' or 'hook', got {mode!r}")


def apply_permanently(unet: nn.Module, edit: UNetEdit, factor: float = 0.0) -> nn.Module:
    """Scale the edit's weights in place for good (``factor`` 0 zeroes the value rows); returns ``unet``."""
    with torch.no_grad():
        for param, mult in edit.weight_multipliers(unet, factor).items():
            param.mul_(mult.to(device=param.device, dtype=param.dtype))
    return unet


def save_edited(pipe, edit: UNetEdit, out_dir: str | os.PathLike, factor: float = 0.0) -> Path:
    """Write ``pipe`` with ``edit`` applied to ``out_dir`` (``save_pretrained``, safetensors), leaving ``pipe`` unedited.

    The edit itself is saved beside it as ``diffmem_edit.json``. The edited model keeps the original's
    fingerprint, so the same edit still validates against it.
    """
    from diffmem.io import atomic_write_json

    out = Path(out_dir)
    with applied(pipe.unet, edit, mode="weight", factor=factor):
        pipe.save_pretrained(out, safe_serialization=True)
    atomic_write_json(out / EDIT_RECORD, {"factor": factor, "edit": edit.to_dict()})
    return out
