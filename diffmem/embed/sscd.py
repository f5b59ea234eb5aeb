"""SSCD copy-detection descriptors (Pizzi et al., CVPR'22) from a local TorchScript or ONNX file.

The published models (``sscd_disc_mixup``: ResNet-50, 512-d, the recommended default;
``sscd_disc_large``: ResNeXt-101, 1024-d) are TorchScript files under CC-BY-NC 4.0: users download
them; diffmem never bundles them. Loading TorchScript runs code stored in the file, so it needs an
explicit ``allow_torchscript=True`` (``--allow-torchscript``). The ONNX route needs ``onnxruntime``
(``pip install diffmem[onnx]``) and runs no Python code from the file.

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
from diffmem.embed.transforms import PREPROCESSINGS, sscd_transform, stack_batch


class SSCDEmbedder(Embedder):
    """SSCD descriptors from any callable mapping a ``(n, 3, H, W)`` float tensor to ``(n, d)``."""

    replication_threshold = 0.5
    verbatim_threshold = 0.7

    def __init__(
        self, forward, dim: int, preprocessing: str = "small_288", name: str = "sscd", batch_size: int = 16
    ):
        if preprocessing not in PREPROCESSINGS:
            raise ValueError(
                f"--sscd-preprocessing: unknown preprocessing {preprocessing!r} (choose from {', '.join(PREPROCESSINGS)})"
            )
        self._forward = forward
        self._transform = sscd_transform(preprocessing)
        self.dim = dim
        self.name = name
        self.preprocessing = f"{preprocessing}: {PREPROCESSINGS[preprocessing]}"
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
    input_name = session.get_inputs()[0].name

    def forward(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {input_name: x.numpy().astype(np.float32)})[0]

    name = f"sscd-onnx:{path.name}"
    return SSCDEmbedder(forward, _probe_dim(forward), preprocessing, name=name, batch_size=batch_size)
