"""Options shared by the commands that take an edit and target images (``diffmem attack``, ``diffmem
finetune``): the edit's arguments; the targets and their images are read by the library's
:mod:`diffmem.train.dori_finetune` (re-exported here)."""

from __future__ import annotations

import argparse

from diffmem.cli import UsageError
from diffmem.edits import NeuronSet, WeightMask
from diffmem.train.dori_finetune import load_image_tensor, load_targets

__all__ = ["add_edit_arguments", "load_edit", "load_image_tensor", "load_targets"]


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """``--mask`` / ``--neurons``: an edit applied at run time (shared by attack and finetune)."""
    p.add_argument(
        "--mask", default=None, help="a WeightMask (.safetensors from diffmem prune) applied while attacking"
    )
    p.add_argument(
        "--neurons", default=None, help="a NeuronSet (.json from diffmem localize) applied while attacking"
    )


def load_edit(args: argparse.Namespace):
    """The edit named by ``--mask`` / ``--neurons`` (None without either)."""
    if args.mask and args.neurons:
        raise UsageError("give --mask or --neurons, not both")
    if args.mask:
        return WeightMask.load(args.mask, "--mask")
    if args.neurons:
        try:
            return NeuronSet.load(args.neurons)
        except (ValueError, FileNotFoundError) as err:
            raise type(err)(f"--neurons: {err}") from None
    return None
