"""A small, exact copy of an organism training run to commit and resume from on another machine.

An organism run lives in its ``--workdir`` (checkpoints, the autoencoder's phases, cached latents). Its
latest checkpoint is the whole state an exact resume needs, but most of it is predictable: the rows of
the CLIP token embedding that no caption uses keep their seeded initial values, and their Adam moments
stay zero (about 75 MB of the v4 run's 160). :func:`export_run` writes the checkpoint with every tensor
stored as its rows that differ from that reference (the seeded initial weights, zeros for optimizer
state), plus the finished autoencoder phases and the recipe; :func:`import_run` rebuilds the checkpoint
bit for bit in a fresh workdir, from which ``diffmem organism train`` resumes. Latents are not carried:
they are recomputed from the images and the autoencoder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffmem.io import atomic_write_json
from diffmem.organism.recipe import OrganismRecipe
from diffmem.train.checkpoint import latest_checkpoint
from diffmem.train.organism import build_organism_components

__all__ = ["export_run", "import_run"]

BUNDLE_FORMAT = "diffmem.organism_run/1"
#: files of a workdir that finished phases leave, carried as they are
PHASE_FILES = (
    "recipe.json",
    "vae-final.safetensors",
    "vae-log.json",
    "decoder-final.safetensors",
    "decoder-log.json",
)


def _references(recipe: OrganismRecipe, model_file: str) -> dict[str, torch.Tensor]:
    """The seeded initial state of the module a checkpoint's ``model-<name>.safetensors`` holds."""
    name = model_file.removeprefix("model-").removesuffix(".safetensors")
    components = build_organism_components(recipe)
    if name in components:
        return components[name].state_dict()
    if name == "decoder":
        vae = components["vae"]
        return torch.nn.ModuleDict(
            {"post_quant_conv": vae.post_quant_conv, "decoder": vae.decoder}
        ).state_dict()
    return {}


def _pack(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor as the rows (along dim 0) that differ from its reference (zeros where there is none)."""
    out = {}
    for key, t in tensors.items():
        ref = reference.get(key)
        ref = torch.zeros_like(t) if ref is None or ref.shape != t.shape or ref.dtype != t.dtype else ref
        if t.dim() == 0:
            out[f"{key}::full"] = t
            continue
        differs = (t != ref).reshape(t.shape[0], -1).any(dim=1)
        rows = differs.nonzero().flatten()
        if len(rows) == t.shape[0]:
            out[f"{key}::full"] = t
        else:
            out[f"{key}::rows"] = rows
            out[f"{key}::values"] = t[rows].contiguous()
            out[f"{key}::shape"] = torch.tensor(t.shape, dtype=torch.int64)
    return out


def _unpack(
    packed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtypes: dict[str, str]
) -> dict:
    out = {}
    for name in {k.rsplit("::", 1)[0] for k in packed}:
        if f"{name}::full" in packed:
            out[name] = packed[f"{name}::full"]
            continue
        shape = tuple(packed[f"{name}::shape"].tolist())
        dtype = getattr(torch, dtypes[name])
        ref = reference.get(name)
        base = ref.clone() if ref is not None and tuple(ref.shape) == shape and ref.dtype == dtype else None
        t = base if base is not None else torch.zeros(shape, dtype=dtype)
        t[packed[f"{name}::rows"]] = packed[f"{name}::values"]
        out[name] = t
    return out


#: the phases of an organism run, last first: the latest checkpoint of the latest phase is exported
PHASES = ("unet", "decoder", "vae")


#: a phase's file once it is finished (its checkpoints are then not needed to resume)
FINISHED = {"vae": "vae-final.safetensors", "decoder": "decoder-final.safetensors"}


def export_run(workdir: str | os.PathLike, out: str | os.PathLike, phase: str | None = None) -> Path:
    """Write ``workdir``'s finished phases' files and the latest checkpoint of the latest phase that has one
    (the UNet's, else the decoder's or the autoencoder's; or of ``phase``) to ``out``. A finished phase
    needs no checkpoint: ``phase="decoder"`` after the decoder phase carries its final weights only."""
    workdir, out = Path(workdir), Path(out)
    if phase is not None and phase not in PHASES:
        raise ValueError(f"phase: expected one of {', '.join(PHASES)}, got {phase!r}")
    recipe = OrganismRecipe.from_dict(json.loads((workdir / "recipe.json").read_text()))
    phases = PHASES if phase is None else PHASES[PHASES.index(phase) :]
    phase, checkpoint = next(
        ((p, c) for p in phases if (c := latest_checkpoint(workdir / "checkpoints" / p)) is not None),
        (None, None),
    )
    if phase in FINISHED and (workdir / FINISHED[phase]).is_file():
        checkpoint = None
    if checkpoint is None and not any((workdir / name).is_file() for name in FINISHED.values()):
        raise ValueError(f"{workdir}: no checkpoint and no finished phase yet (nothing to export)")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtypes = {}
    if checkpoint is not None:
        (tmp / "checkpoint").mkdir()
        for path in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            reference = _references(recipe, path.name) if path.name.startswith("model-") else {}
            dtypes[path.name] = {k: str(t.dtype).removeprefix("torch.") for k, t in tensors.items()}
            save_file(_pack(tensors, reference), str(tmp / "checkpoint" / path.name))
        shutil.copy2(checkpoint / "state.json", tmp / "checkpoint" / "state.json")
    for name in PHASE_FILES:
        if (workdir / name).is_file():
            shutil.copy2(workdir / name, tmp / name)
    meta = {
        "format": BUNDLE_FORMAT,
        "phase": phase if checkpoint is not None else None,
        "checkpoint": checkpoint.name if checkpoint is not None else None,
        "dtypes": dtypes,
    }
    atomic_write_json(tmp / "bundle.json", meta)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def import_run(bundle: str | os.PathLike, workdir: str | os.PathLike) -> Path:
    """Rebuild the run of ``bundle`` in ``workdir`` (which must hold no run yet); returns the rebuilt
    checkpoint folder (``workdir`` when the bundle carries finished phases only)."""
    bundle, workdir = Path(bundle), Path(workdir)
    meta_path = bundle / "bundle.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{bundle}: not an organism run bundle ({err})") from None
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{meta_path}: expected format {BUNDLE_FORMAT!r}, got {meta.get('format')!r}")
    phase = meta.get("phase")
    if any((workdir / "checkpoints").glob("*/step-*")) or any(
        (workdir / n).is_file() for n in FINISHED.values()
    ):
        raise ValueError(f"{workdir}: already holds a run; import into an empty workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    for name in PHASE_FILES:
        if (bundle / name).is_file():
            shutil.copy2(bundle / name, workdir / name)
    if phase is None:
        return workdir
    recipe = OrganismRecipe.from_dict(json.loads((bundle / "recipe.json").read_text()))
    target = workdir / "checkpoints" / phase / meta["checkpoint"]
    target.mkdir(parents=True)
    for path in sorted((bundle / "checkpoint").glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            packed = {k: f.get_tensor(k) for k in f.keys()}
        reference = _references(recipe, path.name) if path.name.startswith("model-") else {}
        save_file(_unpack(packed, reference, meta["dtypes"][path.name]), str(target / path.name))
    shutil.copy2(
        bundle / "checkpoint" / "state.json", target / "state.json"
    )  # last: the checkpoint is complete
    return target
