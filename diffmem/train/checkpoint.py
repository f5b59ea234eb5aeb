"""Checkpoint and resume for training loops (accelerate or plain torch), safetensors + JSON only.

A checkpoint is a folder ``<root>/step-<N>/`` holding ``model-<name>.safetensors`` per module,
``optim-<name>.safetensors`` per optimizer (its tensors; the rest of its state in ``state.json``),
and ``state.json`` (step, scheduler states, any JSON-able ``extra``). It is written to a temporary
folder and renamed into place, so a kill at any moment leaves the previous checkpoint intact; no
pickle is ever written or read.

Loops that derive every random draw from ``(seed, step)`` (``diffmem.seeding``) resume to exactly
the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

_STEP_PREFIX = "step-"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # accelerate / DDP wrappers keep the real module in .module
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, dict] = {}
    for idx, entry in state["state"].items():
        rest[str(idx)] = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                rest[str(idx)][key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": rest}


def _join_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["scalars"].items()}
    for name, value in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write ``<root>/step-<step>/`` atomically and keep only the newest ``keep`` checkpoints."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for name, module in modules.items():
            state = {k: v.detach().cpu().contiguous() for k, v in _unwrap(module).state_dict().items()}
            save_file(state, str(tmp / f"model-{name}.safetensors"))
        optim_meta = {}
        for name, opt in (optimizers or {}).items():
            tensors, meta = _split_optimizer_state(opt.state_dict())
            save_file(tensors, str(tmp / f"optim-{name}.safetensors"))
            optim_meta[name] = meta
        state = {
            "step": int(step),
            "optimizers": optim_meta,
            "schedulers": {n: s.state_dict() for n, s in (schedulers or {}).items()},
            "extra": dict(extra or {}),
        }
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_STEP_PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_STEP_PREFIX) :]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(
    folder: str | os.PathLike,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
) -> dict:
    """Restore modules, optimizers and schedulers from ``folder`` in place; returns ``{"step", "extra"}``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no state.json (not a diffmem checkpoint)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    for name, module in modules.items():
        path = folder / f"model-{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} lacks {path.name}")
        _unwrap(module).load_state_dict(load_file(str(path)))
    for name, opt in (optimizers or {}).items():
        if name not in state["optimizers"]:
            raise ValueError(f"checkpoint {folder} has no optimizer {name!r}")
        tensors = load_file(str(folder / f"optim-{name}.safetensors"))
        opt.load_state_dict(_join_optimizer_state(tensors, state["optimizers"][name]))
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][name])
    return {"step": state["step"], "extra": state["extra"]}
