"""Stage caching for long evaluations: each stage's result is a file, computed once and reused by a rerun.

A stage is reused only when the settings it was computed with (``key``) are the ones asked for now, so
changing a setting recomputes what depends on it and nothing else. Files are written atomically: a
killed run loses at most the stage it was in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from diffmem.io import atomic_save_tensors, atomic_write_json

__all__ = ["StageCache"]

T = TypeVar("T")


class StageCache:
    """``folder/<name>.json`` (``value``) and ``folder/<name>.safetensors`` (``tensor``) per stage."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def value(self, name: str, compute: Callable[[], T], key: Any = None) -> T:
        """A JSON-able result of ``compute()``, read from ``name.json`` when it holds the same ``key``."""

        path = self.folder / f"{name}.json"
        key = json.loads(json.dumps(key))  # as it reads back (tuples become lists), so a rerun matches
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(saved, dict) and saved.get("key") == key and "value" in saved:
                return saved["value"]
        value = compute()
        atomic_write_json(path, {"key": key, "value": value})
        return value

    def tensor(self, name: str, compute: Callable[[], torch.Tensor], key: Any = None) -> torch.Tensor:
        """A tensor result of ``compute()``, read from ``name.safetensors`` when it holds the same ``key``."""
        from safetensors import safe_open

        path = self.folder / f"{name}.safetensors"
        wanted = json.dumps(key, sort_keys=True)
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") == wanted:
                    return f.get_tensor("value")
        value = compute()
        atomic_save_tensors(path, {"value": value.contiguous()}, metadata={"key": wanted})
        return value
