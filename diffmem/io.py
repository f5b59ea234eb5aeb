"""Atomic file output (a result is either fully written or not there at all), and checked safetensors input."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Set (to anything but "" or "0") to let pickle-based weight files load (``diffmem --allow-pickle``).
ALLOW_PICKLE_ENV = "DIFFMEM_ALLOW_PICKLE"


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # the mode a plain open() would give, not mkstemp's 0600
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_out_path(path: str | os.PathLike, argument: str = "--out", *, folder: bool = True) -> Path:
    """``path`` if an output can go there: a folder (``folder=True``) or a file to write, not a path
    through a file; else a ``ValueError`` naming ``argument``, the path and what was expected."""
    path = Path(path)
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{argument}: {path} cannot be made: {parent} is a file, not a folder")
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{argument}: {path} is a file; expected a folder (new, or one to resume)")
    if not folder and path.is_dir():
        raise ValueError(f"{argument}: {path} is a folder; expected the path of a file to write")
    return path


def remove_stale_temporaries(folders) -> int:
    """Delete the temporary files that killed ``atomic_write`` calls left in ``folders`` (``.NAME.*.tmp``,
    not recursive; missing folders are skipped); returns how many. Call it only where no other writer is
    running (a rerun's main process, before its workers start)."""
    removed = 0
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink(missing_ok=True)
                removed += 1
    return removed


def first_difference(old: dict[str, Any], new: dict[str, Any]) -> str | None:
    """The first key (in sorted order) whose value differs between two records, or ``None``: what a
    refused resume names."""
    return next((k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)), None)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_text(path: str | os.PathLike, argument: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); a file that is not UTF-8 is a
    ``ValueError`` naming ``argument``, the file, the line and the byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{argument}: {path} line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_tensors(
    path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> Path:
    """Save tensors as safetensors, atomically."""
    from safetensors.torch import save_file

    return atomic_write(
        path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    )


def read_safetensors(
    path: str | os.PathLike, argument: str, missing_hint: str
) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a safetensors file (on the CPU; no pickle).

    Errors name ``argument`` (when given) and the path: ``FileNotFoundError`` (with ``missing_hint``) for a missing
    file, ``ValueError`` for a file that is not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    named = f"{argument}: {path}" if argument else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{named} does not exist ({missing_hint})")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{named} is not a safetensors file ({err})") from err
    return tensors, meta


def load_checked_safetensors(
    path: str | os.PathLike, *, format: str, what: str, argument: str, missing_hint: str
) -> tuple[dict, dict[str, str]]:
    """Tensors and metadata of a safetensors file whose metadata ``format`` is ``format``.

    Errors name ``argument`` and the path: ``FileNotFoundError`` (with ``missing_hint``) for a missing
    file, ``ValueError`` for a file that is not safetensors or not ``what`` (another ``format``).
    """
    tensors, meta = read_safetensors(path, argument, missing_hint)
    if meta.get("format") != format:
        raise ValueError(f"{argument}: {path} is not {what} (format {meta.get('format')!r})")
    return tensors, meta
