"""The identity of a model: a hash of every UNet weight, cached per state of the weights and per weight file.

An edit, a calibration or a SolidMark key carries the fingerprint of the model it was made on and is
refused on another (:func:`check_fingerprint`). This module imports nothing of diffmem: every layer above
may use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

#: Weight-file suffixes that are pickles (loaded only behind an explicit flag).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


#: File written beside an exported edited model (``diffmem.edits.save_edited``): the edit that was applied
#: and the fingerprint of the edited weights, so a load of exactly those weights keeps the base model's id.
EDIT_RECORD = "diffmem_edit.json"


class FingerprintMismatchError(ValueError):
    """An edit, calibration or key was made for another model than the one it is applied to."""


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


#: Prefix of the current fingerprint scheme (every weight); the old one (``legacy_fingerprint``) was 16
#: hex digits of names, shapes and the input/time layers only.
FINGERPRINT_PREFIX = "w2-"
_CACHE_ATTR = "_diffmem_fingerprint"


def _state_key(unet: torch.nn.Module) -> tuple:
    """Identity of the UNet's current weights: each tensor's storage, device, dtype and in-place version."""
    tensors = list(unet.parameters()) + list(unet.buffers())
    return tuple((t.data_ptr(), str(t.device), t.dtype, t._version) for t in tensors)


def content_fingerprint(unet: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes, values rounded to float16), uncached.

    Rounding to float16 makes a float32 and a float16 load of the same checkpoint agree (diffusers casts
    with the same rounding). A bfloat16 copy rounds differently: loaded from a folder it gets the
    fingerprint of the folder's files (:func:`fingerprint_loaded`), built in memory its own.
    """
    state = unet.state_dict()
    return _hash_tensors((name, state[name]) for name in sorted(state))


def _hash_tensors(items) -> str:
    """The ``w2-`` hash of ``(name, tensor)`` pairs in the order given (names, shapes, float16-rounded values)."""
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        if t.is_floating_point():
            t = t.to(torch.float16)
        h.update(t.to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return FINGERPRINT_PREFIX + h.hexdigest()[:20]


def _files_fingerprint(folder: Path, unet: torch.nn.Module) -> str | None:
    """:func:`content_fingerprint` of the UNet weights in ``folder``'s safetensors files (the precision on
    disk, read one tensor at a time), or ``None`` when they are not exactly ``unet``'s parameters."""
    files = [
        p
        for p in sorted((folder / "unet").glob("diffusion_pytorch_model*.safetensors"))
        if "." not in p.name.removesuffix(".safetensors")  # no variant (".fp16"): what from_pretrained read
    ]
    where: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            where.update((name, path) for name in f.keys())
    state = unet.state_dict()
    if set(where) != set(state):
        return None
    with contextlib.ExitStack() as stack:
        opened = {p: stack.enter_context(safe_open(str(p), "pt")) for p in files}
        return _hash_tensors((name, opened[where[name]].get_tensor(name)) for name in sorted(state))


def model_fingerprint(unet: torch.nn.Module) -> str:
    """The id of the model ``unet`` holds: :func:`content_fingerprint`, computed once per state of its weights.

    Cached on the module by tensor identity and PyTorch's in-place version counters, so any optimizer
    step, ``load_state_dict`` or in-place change gives a new id, while repeated checks cost nothing.
    diffmem's own reversible edits (``diffmem.edits.applied``) keep the id of the model they were applied
    to (:func:`remember_fingerprint`); writes through ``tensor.data`` bypass the version counter and are
    not seen.
    """
    key = _state_key(unet)
    cached = getattr(unet, _CACHE_ATTR, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    fingerprint = content_fingerprint(unet)
    object.__setattr__(unet, _CACHE_ATTR, (key, fingerprint))
    return fingerprint


def remember_fingerprint(unet: torch.nn.Module, fingerprint: str) -> None:
    """Record that ``unet``'s weights, as they are now, are the model ``fingerprint`` (an edited copy of it)."""
    object.__setattr__(unet, _CACHE_ATTR, (_state_key(unet), fingerprint))


def _cache_file() -> Path:
    """Where fingerprints of weight files are remembered (``$DIFFMEM_CACHE_DIR``, else the user cache)."""
    root = os.environ.get("DIFFMEM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "diffmem"
    )
    return Path(root) / "fingerprints.json"


def _file_identity(folder: Path, dtype: torch.dtype) -> str | None:
    """The UNet weight files of a model folder (real path, inode, size, mtime, ctime) and the load dtype."""
    unet = folder / "unet"
    files = (
        sorted(p for p in unet.glob("*") if p.suffix in (".safetensors", *PICKLE_SUFFIXES))
        if unet.is_dir()
        else []
    )
    if not files:
        return None
    stats = [(p.resolve(), p.stat()) for p in files]  # ctime changes on any write or rename; no one sets it
    parts = [f"{r}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}" for r, st in stats]
    return hashlib.sha256(("|".join(parts) + f"|{dtype}").encode()).hexdigest()


def fingerprint_loaded(folder: str | os.PathLike, unet: torch.nn.Module) -> str:
    """:func:`model_fingerprint` of ``unet`` just loaded from ``folder``, remembered by the identity of the
    weight files (path, inode, size, mtime, ctime, dtype) so that loading the same files again costs no
    hashing; rewriting a file changes its identity and it is hashed again."""
    identity = _file_identity(Path(folder), next(unet.parameters()).dtype)
    if identity is None:
        return model_fingerprint(unet)
    path = _cache_file()
    try:
        known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        known = {}  # an unreadable cache is rebuilt
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(identity), str):
        remember_fingerprint(unet, known[identity])
        return known[identity]
    fingerprint = None
    if next(unet.parameters()).dtype not in (torch.float32, torch.float16):  # bfloat16: the files' identity
        fingerprint = _files_fingerprint(Path(folder), unet)
    if fingerprint is None:
        fingerprint = model_fingerprint(unet)
    else:
        remember_fingerprint(unet, fingerprint)
    known[identity] = fingerprint
    try:
        _write_atomically(path, json.dumps(dict(list(known.items())[-1000:])))
    except OSError:
        pass  # a read-only home: the fingerprint is still right, only not remembered
    return fingerprint


def legacy_fingerprint(unet: torch.nn.Module) -> str:
    """The fingerprint of diffmem before ``w2-``: names, shapes and the conv_in/time_embedding values.

    Kept only to tell an old edit "made for another model" from "re-make it for this one"; it cannot
    tell a model from a fine-tune of it.
    """
    h = hashlib.sha256()
    state = unet.state_dict()
    for name in sorted(state):
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    for name in sorted(state):
        if name.startswith(("conv_in.", "time_embedding.")):
            h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def fingerprint_problem(expected: str | None, unet: torch.nn.Module, what: str, fix: str) -> str | None:
    """``None`` when ``expected`` is ``unet``'s fingerprint, else one line saying why ``what`` does not fit.

    ``fix`` says what to do (e.g. "localize the neurons on this model").
    """
    if expected is None:
        return None
    actual = model_fingerprint(unet)
    if expected == actual:
        return None
    if not str(expected).startswith(FINGERPRINT_PREFIX):
        if legacy_fingerprint(unet) == expected:
            return (
                f"{what} carries diffmem's old fingerprint {expected} (parameter names, shapes and input "
                f"layers only), which cannot tell this model from a fine-tune of it: {fix}"
            )
        return f"{what} was made for another model (old fingerprint {expected}); {fix}"
    return f"{what} was made for the model with fingerprint {expected}, not for this one ({actual}): {fix}"


def check_fingerprint(expected: str | None, unet: torch.nn.Module, what: str, fix: str) -> None:
    """Raise :class:`FingerprintMismatchError` when ``what`` was made for another model."""
    problem = fingerprint_problem(expected, unet, what, fix)
    if problem is not None:
        raise FingerprintMismatchError(problem)


def adopt_edit_record(folder: str | os.PathLike, unet: torch.nn.Module) -> bool:
    """After loading ``folder``: when its ``diffmem_edit.json`` names exactly the weights ``unet`` holds,
    ``unet`` keeps the fingerprint of the model the edit was made on. Returns whether it did."""
    path = Path(folder) / EDIT_RECORD
    if not path.is_file():
        return False
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        base, edited = record["edit"]["fingerprint"], record["edited_fingerprint"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return False  # an older or foreign record: the folder is its own model
    if base and model_fingerprint(unet) == edited:
        remember_fingerprint(unet, base)
        return True
    return False
