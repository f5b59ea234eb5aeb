"""Edits of a UNet's weights: the :class:`Edit` protocol, its two kinds and the pipelines' loader mixin.

``localize/`` computes edits (NeMo's neurons, subspace pruning's masks); this package defines them,
saves and loads them, and applies them (at run time, for every later call, or for good).
"""

from diffmem.edits.base import Edit, applied, apply_permanently, save_edited, write_edit_record
from diffmem.edits.loader import EditLoaderMixin
from diffmem.edits.loading import load_edit
from diffmem.edits.neuron_set import NeuronSet
from diffmem.edits.weight_mask import WeightMask
from diffmem.fingerprint import EDIT_RECORD, FingerprintMismatchError, adopt_edit_record

__all__ = [
    "EDIT_RECORD",
    "Edit",
    "EditLoaderMixin",
    "FingerprintMismatchError",
    "NeuronSet",
    "WeightMask",
    "adopt_edit_record",
    "applied",
    "apply_permanently",
    "load_edit",
    "save_edited",
    "write_edit_record",
]
