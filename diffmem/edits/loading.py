"""Read any saved edit: an edit folder, a ``NeuronSet`` JSON file or a ``WeightMask`` .safetensors file."""

from __future__ import annotations

import os
from pathlib import Path

from diffmem.edits.base import Edit
from diffmem.edits.neuron_set import NeuronSet
from diffmem.edits.weight_mask import WeightMask


def load_edit(path: str | os.PathLike) -> Edit:
    """An edit from a folder (:meth:`Edit.from_pretrained`), a ``NeuronSet`` JSON file or a ``WeightMask`` .safetensors."""
    path = Path(path)
    if path.is_dir():
        return Edit.from_pretrained(path)
    if path.suffix == ".json":
        return NeuronSet.load(path)
    if path.suffix == ".safetensors":
        return WeightMask.load(path)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist (expected an edit folder, a NeuronSet .json or a WeightMask .safetensors)"
        )
    raise ValueError(f"{path}: expected an edit folder, a NeuronSet .json or a WeightMask .safetensors")
