"""Checkpoint and resume for training loops (accelerate or plain torch), safetensors + JSON only.

A checkpoint is a folder ``<root>/step-<N>/`` holding ``model-<name>.safetensors`` per module,
``optim-<name>.safetensors`` per optimizer (its tensors; the rest of its state in ``state.json``),
and ``state.json`` (step, scheduler states, any JSON-able ``extra``, and ``model_contents``: per module,
``"full"``, its whole ``state_dict``, or ``"trainable"``, only the parameters that require gradients,
e.g. LoRA adapters on a frozen base that the caller rebuilds before loading). It is written to a
temporary folder and renamed into place, so a kill at any moment leaves the previous checkpoint intact;
no pickle is ever written or read.

Loops that derive every random draw from ``(seed, step)`` (``diffmem.seeding``) resume to exactly
the weights an uninterrupted run reaches.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

_STEP_PREFIX = "step-"
#: What a module's model file holds (``state.json["model_contents"]``); checkpoints without it hold "full".
FULL, TRAINABLE = "full", "trainable"


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    # accelerate / DDP wrappers keep the real module in .module
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors by path (``"<param>/<key>[/<key>...]"``: nested dicts, e.g. bitsandbytes' quantization
    state, are flattened) for safetensors, and the JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = (
        set()
    )  # safetensors refuses shared memory (bitsandbytes shares its quantization maps)

    def split(entry: dict, prefix: str) -> dict:
        rest = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().contiguous()
                ptr = value.untyped_storage().data_ptr()
                tensors[f"{prefix}/{key}"] = value.clone() if ptr in storages else value
                storages.add(ptr)
            elif isinstance(value, dict):
                rest[key] = {"__nested__": split(value, f"{prefix}/{key}")}
            else:
                rest[key] = value
        return rest

    rest = {str(idx): split(entry, str(idx)) for idx, entry in state["state"].items()}
    return tensors, {"param_groups": state["param_groups"], "scalars": rest}


def _join_optimizer_state(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    def unnest(entry: dict) -> dict:
        return {
            k: unnest(v["__nested__"]) if isinstance(v, dict) and "__nested__" in v else v
            for k, v in entry.items()
        }

    state: dict[int, dict] = {int(i): unnest(v) for i, v in meta["scalars"].items()}
    for name, value in tensors.items():
        idx, *keys = name.split("/")
        node = state.setdefault(int(idx), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _trainable_names(module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    keep: int = 2,
    trainable_only: Collection[str] = (),
) -> Path:
    """Write ``<root>/step-<step>/`` atomically and keep only the newest ``keep`` checkpoints.

    Modules named in ``trainable_only`` save only their parameters that require gradients (adapters:
    a LoRA checkpoint does not hold the whole UNet); the others save their whole ``state_dict``.
    """
    from safetensors.torch import save_file

    unknown = set(trainable_only) - set(modules)
    if unknown:
        raise ValueError(f"trainable_only names modules that are not saved: {sorted(unknown)}")

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_STEP_PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        contents = {}
        for name, module in modules.items():
            module = _unwrap(module)
            state = module.state_dict()
            contents[name] = TRAINABLE if name in trainable_only else FULL
            if name in trainable_only:
                state = {k: state[k] for k in _trainable_names(module)}
                if not state:
                    raise ValueError(f"module {name!r} has no trainable parameters to save")
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
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
            "model_contents": contents,
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
    for stale in root.glob(f".{_STEP_PREFIX}*"):  # temporary folders of writes killed before their rename
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
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
    """Restore modules, optimizers and schedulers from ``folder`` in place; returns ``{"step", "extra"}``.

    A module saved ``"trainable"`` gets only those tensors; its trainable parameters now must be exactly
    the ones saved (rebuild the adapters first), the rest of it stays as it is.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    state_file = folder / "state.json"
    if not state_file.is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no state.json (not a diffmem checkpoint)")
    state = json.loads(state_file.read_text(encoding="utf-8"))
    contents = state.get("model_contents", {})
    for name, module in modules.items():
        path = folder / f"model-{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {folder} lacks {path.name}")
        module, tensors = _unwrap(module), load_file(str(path))
        kind = contents.get(name, FULL)
        if kind == FULL:
            module.load_state_dict(tensors)
        elif kind == TRAINABLE:
            expected = set(_trainable_names(module))
            if set(tensors) != expected:
                raise ValueError(
                    f"checkpoint {folder} holds trainable tensors of {name!r} that do not match its trainable "
                    f"parameters ({len(set(tensors) - expected)} unknown, {len(expected - set(tensors))} "
                    "missing): add the same adapters before loading"
                )
            module.load_state_dict(tensors, strict=False)
        else:
            raise ValueError(f"checkpoint {folder}: unknown contents {kind!r} of model {name!r}")
    for name, opt in (optimizers or {}).items():
        if name not in state["optimizers"]:
            raise ValueError(f"checkpoint {folder} has no optimizer {name!r}")
        tensors = load_file(str(folder / f"optim-{name}.safetensors"))
        opt.load_state_dict(_join_optimizer_state(tensors, state["optimizers"][name]))
    for name, sched in (schedulers or {}).items():
        sched.load_state_dict(state["schedulers"][name])
    return {"step": state["step"], "extra": state["extra"]}
