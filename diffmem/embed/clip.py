"""open_clip image embeddings from a local checkpoint, with the model's own evaluation preprocessing.

No pretrained CLIP weights ship with diffmem: give the architecture name (``open_clip.list_models()``)
and a local state-dict file. Safetensors loads by default; a pickle checkpoint (``.pt``/``.bin``) needs
``allow_pickle=True`` and is then read with ``torch.load(weights_only=True)``.

Thresholds: CLIP has no published copy threshold (unrelated photos already reach cosine 0.5-0.8),
so the defaults (0.9 replication, 0.95 verbatim) are diffmem's own rough choice: calibrate them
against the scan's background distribution.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmem.embed.base import Embedder


def load_state_dict(
    path: str | os.PathLike, *, allow_pickle: bool = False, argument: str = "--embedder-file"
) -> dict:
    """A state dict from safetensors, or from a pickle file only when ``allow_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise ValueError(
            f"{argument}: {path} is not a .safetensors file; pickle checkpoints can run code when loaded: "
            "convert it to safetensors, or pass --allow-pickle if you trust it"
        )
    import pickle

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{argument}: {path} is a pickle holding more than tensors, refused by safe (weights_only) "
            "loading; diffmem does not load arbitrary pickles: convert the checkpoint to safetensors"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(
            f"{argument}: {path} is not a readable checkpoint ({str(err).splitlines()[0]})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{argument}: {path} does not hold a state dict (names -> tensors)")
    return state


class OpenCLIPEmbedder(Embedder):
    """Image tower of an open_clip model; preprocessing = the model's ``preprocess_val`` transform."""

    replication_threshold = 0.9
    verbatim_threshold = 0.95

    def __init__(
        self, model, preprocess, name: str, device: str | torch.device = "cpu", batch_size: int = 32
    ):
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.device = device
        self.name = name
        self.batch_size = batch_size
        self.preprocessing = " -> ".join(
            type(t).__name__ + _args(t) for t in getattr(preprocess, "transforms", [])
        )
        with torch.inference_mode():
            self.dim = int(self.model.encode_image(torch.zeros(1, 3, *_image_size(model))).shape[1])

    def _embed_batch(self, images: Sequence[Any]) -> np.ndarray:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(x).float().cpu().numpy()

    @classmethod
    def from_checkpoint(
        cls,
        model_name: str,
        checkpoint: str | os.PathLike,
        *,
        allow_pickle: bool = False,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
    ) -> OpenCLIPEmbedder:
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(
                f"--embedder-arch: {model_name!r} is not an open_clip architecture (see open_clip.list_models())"
            )
        state = load_state_dict(checkpoint, allow_pickle=allow_pickle)  # checked before any model is built
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(
                f"--embedder-file: {checkpoint} does not fit open_clip {model_name!r}: {str(err).splitlines()[1:2]}"
            ) from None
        visual_missing = [k for k in missing if k.startswith("visual.")]
        if visual_missing or (unexpected and not set(state) & set(model.state_dict())):
            raise ValueError(
                f"--embedder-file: {checkpoint} does not fit open_clip {model_name!r} "
                f"(missing {visual_missing[:3]}, unexpected {list(unexpected)[:3]})"
            )
        return cls(model, preprocess, f"open_clip:{model_name}:{Path(checkpoint).name}", device, batch_size)


def _image_size(model) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", 224)
    return tuple(size) if isinstance(size, (tuple, list)) else (size, size)


def _args(t) -> str:
    for attr in ("size", "mean"):
        if hasattr(t, attr):
            return f"({getattr(t, attr)})"
    return ""
