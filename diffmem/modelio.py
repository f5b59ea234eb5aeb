"""Find, check and load Stable Diffusion folders; the embedded default model; model fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

#: Components every Stable Diffusion folder must have (``model_index.json`` names them).
SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

#: Name of the model organism under ``weights/`` (issue: the model organism).
ORGANISM_NAME = "diffmem-organism-v2"


def weights_dir() -> Path:
    """The project's ``weights/`` folder (``$DIFFMEM_WEIGHTS`` overrides)."""
    env = os.environ.get("DIFFMEM_WEIGHTS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "weights"


def default_model() -> str | None:
    """Path of the embedded default model (the organism) if it is present, else ``None``."""
    path = weights_dir() / ORGANISM_NAME
    return str(path) if (path / "model_index.json").is_file() else None


def looks_local(model: str | os.PathLike) -> bool:
    """True when ``model`` names a folder on disk rather than a hub id (``owner/name``)."""
    model = str(model)
    return os.path.isabs(model) or model.startswith(".") or Path(model).exists() or model.count("/") != 1


def required_components(pipeline_class=None) -> tuple[str, ...]:
    """The components a folder for ``pipeline_class`` must have (default: Stable Diffusion's)."""
    if pipeline_class is None:
        return SD_COMPONENTS
    expected, _ = pipeline_class._get_signature_keys(pipeline_class)
    optional = set(getattr(pipeline_class, "_optional_components", []))
    required = [name for name in SD_COMPONENTS if name in expected]
    return tuple(required + sorted(n for n in expected if n not in optional and n not in required))


def check_sd_folder(path: str | os.PathLike, argument: str = "--model", pipeline_class=None) -> Path:
    """Raise a ``ValueError`` naming ``argument`` unless ``path`` is a complete model folder on disk.

    Every component ``model_index.json`` lists (and every one ``pipeline_class`` requires; default:
    Stable Diffusion's) must be a folder.
    """
    folder = Path(path)
    components = required_components(pipeline_class)
    if not folder.exists():
        raise FileNotFoundError(
            f"{argument}: {folder} does not exist (expected a Stable Diffusion folder or hub id)"
        )
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{argument}: {folder} is not a Stable Diffusion folder: it has no model_index.json "
            f"(expected one with the components {', '.join(components)})"
        )
    try:
        entries = json.loads(index.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{argument}: {index} is not valid JSON ({err})") from err
    listed = [
        name
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]
    missing = [c for c in components if c not in entries or not (folder / c).is_dir()]
    missing += [c for c in listed if c not in missing and not (folder / c).is_dir()]
    if missing:
        raise ValueError(
            f"{argument}: {folder} lacks the component(s) {', '.join(missing)} of a Stable Diffusion pipeline"
        )
    return folder


def load_pipeline(
    model: str | os.PathLike | None = None,
    pipeline_class=None,
    torch_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    argument: str = "--model",
):
    """Load a Stable Diffusion pipeline from a local folder or a hub id (default: the organism).

    Local folders are checked first so that a wrong path gives an error that names ``argument``;
    weights load from safetensors only. Without the organism, a tiny model built from configs
    (``diffmem.tiny``) stands in and a warning says so.
    """
    if model is None:
        model = default_model()
        if model is None:
            import warnings

            from diffmem.tiny import build_tiny_pipeline

            warnings.warn(
                f"no --model given and {weights_dir() / ORGANISM_NAME} is missing: "
                "using an untrained tiny model built from configs",
                stacklevel=2,
            )
            pipe = build_tiny_pipeline(pipeline_class=pipeline_class or guarded_pipeline_class(None))
            return pipe.to(device) if device is not None else pipe
    model = str(model)
    if pipeline_class is None:
        pipeline_class = guarded_pipeline_class(model)
    if looks_local(model):
        check_sd_folder(model, argument, pipeline_class=pipeline_class)
    pipe = pipeline_class.from_pretrained(
        model,
        torch_dtype=torch_dtype,
        use_safetensors=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def guarded_pipeline_class(model: str | os.PathLike | None):
    """The guarded pipeline for ``model``: SDXL's when its ``model_index.json`` names an SDXL pipeline."""
    from diffmem.pipelines import StableDiffusionMemGuardPipeline, StableDiffusionXLMemGuardPipeline

    if model is None:
        return StableDiffusionMemGuardPipeline
    index = Path(str(model)) / "model_index.json"
    name = None
    if index.is_file():
        try:
            name = json.loads(index.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError):
            name = None  # check_sd_folder reports it
    elif not looks_local(model):
        try:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(str(model)).get("_class_name")
        except Exception:  # not reachable: from_pretrained gives the error
            name = None
    if isinstance(name, str) and "XL" in name:
        return StableDiffusionXLMemGuardPipeline
    return StableDiffusionMemGuardPipeline


def model_fingerprint(unet: torch.nn.Module) -> str:
    """A short, stable id of a UNet: SHA-256 over parameter names, shapes and the input/time layers.

    Edits that diffmem makes (zeroed value rows, pruned FFN weights) leave it unchanged, so a
    ``NeuronSet`` found on a model applies to its edited copies; any other model gets another id.
    """
    h = hashlib.sha256()
    state = unet.state_dict()
    for name in sorted(state):
        h.update(f"{name}:{tuple(state[name].shape)};".encode())
    for name in sorted(state):
        if name.startswith(("conv_in.", "time_embedding.")):
            h.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
