"""Options shared by the commands that take an edit and target images (``diffmem attack``, ``diffmem
finetune``): the edit's arguments, the targets and their images."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from diffmem.cli import UsageError
from diffmem.data import load_rgb, open_dataset, split_rows
from diffmem.edits import NeuronSet, WeightMask
from diffmem.records import BadImageError


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """``--mask`` / ``--neurons``: an edit applied at run time (shared by attack and finetune)."""
    p.add_argument(
        "--mask", default=None, help="a WeightMask (.safetensors from diffmem prune) applied while attacking"
    )
    p.add_argument(
        "--neurons", default=None, help="a NeuronSet (.json from diffmem localize) applied while attacking"
    )


def load_targets(path: str, argument: str = "--targets", limit: int | None = None):
    """(id, caption, image path) records of a targets dataset; the first bad row is an error naming it."""
    records, bad = split_rows(open_dataset(path, argument=argument))
    if bad:
        b = bad[0]
        raise ValueError(f"{argument}: {b.source or path} row {b.row} (id {b.id}): {b.reason}: {b.detail}")
    if not records:
        raise ValueError(f"{argument}: {path} holds no targets")
    return records[:limit] if limit else records


def load_image_tensor(path, argument: str = "--targets"):
    """An image file as a float ``[3, H, W]`` tensor in [0, 1]."""
    try:
        im = load_rgb(path)
    except BadImageError as err:
        raise ValueError(f"{argument}: {path}: {err}") from err
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


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
