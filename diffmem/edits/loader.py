"""``EditLoaderMixin``: a pipeline loads an edit for every later call, as diffusers' LoRA loader mixins do."""

from __future__ import annotations

import contextlib
import os

from diffmem.edits.base import Edit, write_edit_record
from diffmem.edits.loading import load_edit
from diffmem.fingerprint import model_fingerprint, remember_fingerprint
from diffmem.hooks.restore import scaled_weights


class EditLoaderMixin:
    """``load_edit`` / ``unload_edit`` / ``active_edit`` for a pipeline with a ``unet``.

    The edit is applied by :func:`~diffmem.hooks.restore.scaled_weights`, held open until
    :meth:`unload_edit`, which writes the exact original weights back. While it is loaded, the UNet keeps
    the fingerprint of the unedited model (its edit is known), and :meth:`_save_edit_record` lets a saved
    folder keep that identity.
    """

    @property
    def active_edit(self) -> Edit | None:
        """The edit loaded with :meth:`load_edit`, or ``None``."""
        loaded = self.__dict__.get("_diffmem_edit")
        return None if loaded is None else loaded[0]

    def load_edit(self, edit: Edit | str | os.PathLike, factor: float = 0.0) -> Edit:
        """Apply an edit (``NeuronSet``, ``WeightMask``, or a path to one) to the UNet for every later call.

        Like loading LoRA weights: it stays until :meth:`unload_edit`, which restores the exact
        original weights. The edit must have been made on this model (its fingerprint is checked).
        """
        if isinstance(edit, (str, os.PathLike)):
            edit = load_edit(edit)
        if not isinstance(edit, Edit):
            raise TypeError(
                f"load_edit: expected a NeuronSet, WeightMask or a path, got {type(edit).__name__}"
            )
        if self.active_edit is not None:
            raise ValueError("an edit is loaded already; call unload_edit() first")
        identity = model_fingerprint(self.unet)
        multipliers = edit.weight_multipliers(self.unet, factor)  # validates against this model
        stack = contextlib.ExitStack()
        stack.enter_context(scaled_weights(multipliers))
        remember_fingerprint(self.unet, identity)  # still this model, with a known edit loaded
        self.__dict__["_diffmem_edit"] = (edit, float(factor), stack, identity)
        return edit

    def unload_edit(self) -> None:
        """Undo :meth:`load_edit` (bit-exact); nothing happens when no edit is loaded."""
        loaded = self.__dict__.pop("_diffmem_edit", None)
        if loaded is None:
            return
        loaded[2].close()
        remember_fingerprint(self.unet, loaded[3])

    def _save_edit_record(self, save_directory: str | os.PathLike) -> None:
        """Beside a saved folder: the loaded edit and the saved weights' fingerprint (a load keeps the
        unedited model's identity while the weights are exactly these)."""
        loaded = self.__dict__.get("_diffmem_edit")
        if loaded is not None:
            write_edit_record(save_directory, loaded[0], loaded[1], self.unet)
