"""One edit type for what localization finds (``NeuronSet``, ``WeightMask``), applied at run time or for good.

An *edit* is an :class:`Edit`: it carries the fingerprint of the model it was found on and

* ``validate(unet)`` (raises :class:`FingerprintMismatchError` on another model, ``ValueError`` on
  layers or indices that do not fit),
* ``weight_multipliers(unet, factor) -> {parameter: multiplier}`` (broadcastable to the parameter:
  rows for a :class:`~diffmem.edits.NeuronSet`, single weights for a :class:`~diffmem.edits.WeightMask`),
* ``save_pretrained(folder)`` / ``Edit.from_pretrained(folder)`` (:class:`diffmem.saved.SavedObject`): a
  folder with ``edit_config.json`` (the class, fingerprint and settings, diffusers' ``ConfigMixin``
  style) and, for an edit with tensors, ``edit.safetensors`` (a ``WeightMask``'s masks; no pickle);
  ``save(file)`` / ``load(file)`` the one-file form the CLI takes.

Edits that can also act on module outputs (``scales(unet, factor) -> {value-layer name: [d]}``,
e.g. ``NeuronSet``) can be applied by forward hooks (``mode="hook"``). Weight mode is the default: it
works with any attention processor; hook mode leaves the weights untouched and checks that its hooks
fired. Either way the model is restored when the ``with`` block ends, even on error. A pipeline with
:class:`~diffmem.edits.EditLoaderMixin` loads an edit for all later calls with ``pipe.load_edit(path)`` /
``pipe.unload_edit()``. Every multiply-and-restore goes through :func:`diffmem.hooks.restore.scaled_weights`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffmem.fingerprint import EDIT_RECORD, content_fingerprint, model_fingerprint, remember_fingerprint
from diffmem.hooks.neurons import scaled_value_neurons
from diffmem.hooks.restore import multiply_weights, scaled_weights
from diffmem.io import atomic_write_json
from diffmem.saved import SavedObject

#: The ``format`` of format-1 edit folders (before :class:`~diffmem.saved.SavedObject`), read as legacy.
LEGACY_EDIT_FORMAT = "diffmem.Edit/1"


class Edit(SavedObject):
    """Base class of UNet edits; subclasses are dataclasses that fill in the methods below.

    Saved as a folder (``edit_config.json``, and ``edit.safetensors`` for an edit with tensors) by
    :class:`~diffmem.saved.SavedObject`; ``Edit.from_pretrained`` returns the class the folder names.
    Format 1 (diffmem 0.1's folders, ``"format": "diffmem.Edit/1"``, every edit's indices in
    ``edit.safetensors``) still loads through each subclass's ``_from_legacy``.
    """

    config_name: ClassVar[str] = "edit_config.json"
    weights_name: ClassVar[str] = "edit.safetensors"
    format_version: ClassVar[int] = 2

    fingerprint: str | None

    # ----------------------------------------------------------------------------------- the protocol
    def validate(self, unet: nn.Module) -> Any:
        raise NotImplementedError

    def weight_multipliers(self, unet: nn.Module, factor: float = 0.0) -> dict[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError


@contextlib.contextmanager
def applied(
    unet: nn.Module, edit: Edit | None, mode: str = "weight", factor: float = 0.0
) -> Iterator[nn.Module]:
    """Context manager: ``unet`` with ``edit`` applied (its weights or outputs scaled by ``factor``, 0 = off).

    ``edit=None`` is the unedited model (so a table's "no mitigation" row takes the same path).
    ``mode="weight"`` scales parameters in place and restores them; ``mode="hook"`` rewrites the
    value layers' outputs with forward hooks (only for edits that define ``scales``). Raises
    :class:`~diffmem.fingerprint.FingerprintMismatchError` for an edit of another model.
    """
    if edit is None:
        yield unet
    elif mode == "weight":
        identity = model_fingerprint(unet)  # the edited weights stay this model (their edit is known)
        try:
            with scaled_weights(edit.weight_multipliers(unet, factor)):
                remember_fingerprint(unet, identity)
                yield unet
        finally:
            remember_fingerprint(unet, identity)
    elif mode == "hook":
        if not hasattr(edit, "scales"):
            raise ValueError(f"{type(edit).__name__} cannot be applied by hooks; use mode='weight'")
        scales = edit.scales(unet, factor)
        modules = dict(unet.named_modules())
        with scaled_value_neurons(unet, {name: modules[name] for name in scales}, scales, mode="hook"):
            yield unet
    else:
        raise ValueError(f"mode must be 'weight' or 'hook', got {mode!r}")


def apply_permanently(unet: nn.Module, edit: Edit, factor: float = 0.0) -> nn.Module:
    """Scale the edit's weights in place for good (``factor`` 0 zeroes the value rows); returns ``unet``."""
    identity = model_fingerprint(unet)
    multiply_weights(edit.weight_multipliers(unet, factor))
    remember_fingerprint(unet, identity)  # an edited copy of the same model
    return unet


def save_edited(pipe, edit: Edit, out_dir: str | os.PathLike, factor: float = 0.0) -> Path:
    """Write ``pipe`` with ``edit`` applied to ``out_dir`` (``save_pretrained``, safetensors), leaving ``pipe`` unedited.

    The edit itself is saved beside it as ``diffmem_edit.json`` with the fingerprint of the edited
    weights: a load whose UNet still has exactly those weights (:func:`adopt_edit_record`) keeps the
    original's fingerprint, so the same edit (and the original's calibration) still validates; a
    fine-tune of the saved folder does not.
    """
    out = Path(out_dir)
    with applied(pipe.unet, edit, mode="weight", factor=factor):
        pipe.save_pretrained(out, safe_serialization=True)
        write_edit_record(out, edit, factor, pipe.unet)
    return out


def write_edit_record(folder: str | os.PathLike, edit: Edit, factor: float, edited_unet: nn.Module) -> Path:
    """``folder/diffmem_edit.json``: the edit applied to the saved weights and the fingerprint of those
    edited weights (``edited_unet`` as saved), which :func:`adopt_edit_record` checks on load."""
    record = {
        "factor": factor,
        "edit": edit.to_dict(),
        "edited_fingerprint": content_fingerprint(edited_unet),
    }
    return atomic_write_json(Path(folder) / EDIT_RECORD, record)
