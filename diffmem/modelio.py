"""Find, check and load Stable Diffusion folders; the embedded default model."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from diffmem.fingerprint import PICKLE_SUFFIXES, adopt_edit_record, fingerprint_loaded, model_fingerprint
from diffmem.io import ALLOW_PICKLE_ENV
from diffmem.precision import dtype_name
from diffmem.tiny import build_tiny_pipeline

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


def pickle_allowed(explicit: bool | None = None) -> bool:
    """Whether pickle-based weights may load: ``explicit`` when given, else ``$DIFFMEM_ALLOW_PICKLE``
    (set by ``diffmem --allow-pickle``). The default is no: safetensors only."""
    if explicit is not None:
        return bool(explicit)

    return os.environ.get(ALLOW_PICKLE_ENV, "") not in ("", "0")


def _read_json(path: Path, argument: str, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{argument}: {path} ({what}) is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{argument}: {path} ({what}) is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: {path} ({what}) must hold a JSON object, not {type(data).__name__}")
    return data


def check_safetensors_file(path: Path, argument: str = "--model") -> None:
    """Raise ``ValueError`` unless ``path`` is a complete safetensors file (header parses, sizes add up).

    Reads the 8-byte header length and the JSON header only; a file cut short by an interrupted copy
    or download is caught before anything loads.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{argument}: {path} is truncated ({size} bytes; not a safetensors file)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size:
            raise ValueError(
                f"{argument}: {path} is truncated or not a safetensors file (header of {n} bytes, file {size})"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(
                f"{argument}: {path} is not a safetensors file (its header is not JSON)"
            ) from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if ends and 8 + n + max(ends) > size:
        raise ValueError(
            f"{argument}: {path} is truncated: its header describes {8 + n + max(ends)} bytes, the file has {size}"
        )


def _check_component(folder: Path, name: str, library_class: list, argument: str, allow_pickle: bool) -> None:
    """One component folder: its config parses, its weights are complete safetensors (or allowed pickle)."""
    where = folder / name
    cls = str(library_class[1]) if len(library_class) > 1 and library_class[1] else ""
    for path in sorted(where.glob("*.json")):
        _read_json(path, argument, f"{name} {path.name}")
    if cls.endswith(("Tokenizer", "TokenizerFast")):
        has_fast = (where / "tokenizer.json").is_file()
        has_bpe = (where / "vocab.json").is_file() and (where / "merges.txt").is_file()
        if not (has_fast or has_bpe):
            raise ValueError(
                f"{argument}: {where} has no tokenizer files (expected tokenizer.json, or vocab.json and "
                "merges.txt)"
            )
        return
    if cls.endswith("Scheduler") or "Scheduler" in cls:
        if not (where / "scheduler_config.json").is_file():
            raise ValueError(f"{argument}: {where} has no scheduler_config.json")
        return
    if cls.endswith(("FeatureExtractor", "ImageProcessor", "Processor")):
        return
    if not (where / "config.json").is_file():
        raise ValueError(f"{argument}: {where} has no config.json (the {name} component's configuration)")
    safetensors = sorted(where.glob("*.safetensors"))
    pickles = sorted(p for p in where.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safetensors and not pickles:
        raise ValueError(f"{argument}: {where} has no weights file (expected *.safetensors)")
    if not safetensors and not allow_pickle:
        raise ValueError(
            f"{argument}: {where} has only pickle weights ({', '.join(p.name for p in pickles)}); diffmem loads "
            "safetensors only: convert them, or pass --allow-pickle (use_safetensors=False in Python) to load them"
        )
    for path in safetensors:
        check_safetensors_file(path, argument)


def check_sd_folder(
    path: str | os.PathLike, argument: str = "--model", pipeline_class=None, allow_pickle: bool | None = None
) -> Path:
    """Raise a ``ValueError`` naming ``argument``, the folder and the component unless ``path`` is a
    complete, loadable model folder.

    Every component ``model_index.json`` lists (and every one ``pipeline_class`` requires; default:
    Stable Diffusion's) must be a folder whose JSON files parse; model components need ``config.json``
    and complete safetensors weights (pickle only with ``allow_pickle``, :func:`pickle_allowed`); a
    tokenizer needs its vocabulary files; a scheduler its ``scheduler_config.json``.
    """
    folder = Path(path)
    components = required_components(pipeline_class)
    if not folder.exists():
        raise FileNotFoundError(
            f"{argument}: {folder} does not exist (expected a Stable Diffusion folder or hub id)"
        )
    if not folder.is_dir():
        raise ValueError(f"{argument}: {folder} is a file, expected a Stable Diffusion folder")
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(
            f"{argument}: {folder} is not a Stable Diffusion folder: it has no model_index.json "
            f"(expected one with the components {', '.join(components)})"
        )
    entries = _read_json(index, argument, "the pipeline index")
    listed = {
        name: value
        for name, value in entries.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    }
    missing = [c for c in components if c not in entries or not (folder / c).is_dir()]
    missing += [c for c in listed if c not in missing and not (folder / c).is_dir()]
    if missing:
        raise ValueError(
            f"{argument}: {folder} lacks the component(s) {', '.join(missing)} of a Stable Diffusion pipeline"
        )
    allow = pickle_allowed(allow_pickle)
    for name, library_class in listed.items():
        _check_component(folder, name, library_class, argument, allow)
    return folder


def check_device(device: str | torch.device | None, argument: str = "--device") -> torch.device | None:
    """The torch device ``device`` names, or a ``ValueError`` naming ``argument`` when it is not one or
    is not available on this machine."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{argument}: {device!r} is not a torch device (expected cpu, cuda, cuda:1, mps, ...)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{argument}: {device} was asked for, but CUDA is not available here (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"{argument}: {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{argument}: {device} was asked for, but MPS is not available here (use cpu)")
    return dev


def model_settings(pipe) -> dict[str, str]:
    """What identifies the model a cached result was made with: its fingerprint and its dtype."""

    return {"model_fingerprint": model_fingerprint(pipe.unet), "dtype": dtype_name(pipe.unet.dtype)}


def model_resolution(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """``(height, width)`` in px: the given ones, each defaulting to the model's own (UNet sample size x VAE factor)."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scale = getattr(pipe, "vae_scale_factor", 8)
    return int(height or h * scale), int(width or w * scale)


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """``dtype=`` where diffusers has it (``torch_dtype`` is deprecated there), ``torch_dtype=`` before."""
    from diffusers.utils import deprecation_utils

    new = hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE")
    return {"dtype": dtype} if new else {"torch_dtype": dtype}


def _no_safety_checker(pipeline_class) -> dict:
    """``safety_checker=None`` for the pipelines that have one (SD 1.x/2.x; SDXL has none)."""
    import inspect

    if "safety_checker" in inspect.signature(pipeline_class.__init__).parameters:
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


@contextlib.contextmanager
def _no_loading_bars():
    """diffusers' and transformers' progress bars off while loading, restored after."""
    # heavy libraries: imported where a load runs, as the rest of this module does
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in was:
            if enabled:
                m.enable_progress_bar()


def load_pipeline(
    model: str | os.PathLike | None = None,
    pipeline_class=None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    argument: str = "--model",
    allow_pickle: bool | None = None,
    progress: bool = True,
):
    """Load a Stable Diffusion pipeline from a local folder or a hub id (default: the organism).
    ``progress=False`` hides diffusers' and transformers' loading bars (a command's ``--no-progress``).

    Local folders are checked first (:func:`check_sd_folder`) so that a wrong path gives an error that
    names ``argument``; weights load from safetensors only unless ``allow_pickle`` (or ``diffmem
    --allow-pickle``). Without the organism, a tiny model built from configs (``diffmem.tiny``) stands
    in and a warning says so.
    """
    if model is None:
        check_device(device)
        model = default_model()
        if model is None:
            import warnings

            warnings.warn(
                f"no --model given and {weights_dir() / ORGANISM_NAME} is missing: "
                "using an untrained tiny model built from configs",
                stacklevel=2,
            )
            pipe = build_tiny_pipeline(pipeline_class=pipeline_class or stock_pipeline_class(None))
            return pipe.to(device) if device is not None else pipe
    model = str(model)
    check_device(device)
    if pipeline_class is None:
        pipeline_class = stock_pipeline_class(model)
    allow = pickle_allowed(allow_pickle)
    if looks_local(model):
        check_sd_folder(model, argument, pipeline_class=pipeline_class, allow_pickle=allow)
    try:
        with contextlib.nullcontext() if progress else _no_loading_bars():
            pipe = pipeline_class.from_pretrained(
                model,
                **_dtype_kwarg(dtype),
                use_safetensors=True
                if not allow
                else None,  # allowed: safetensors first, pickle where missing
                **_no_safety_checker(pipeline_class),
            )
    except OSError as err:
        if looks_local(model):
            raise ValueError(f"{argument}: {model} could not be loaded: {str(err).splitlines()[0]}") from err
        raise ValueError(
            f"{argument}: {model} is not a folder here, and neither the hub nor its local cache has it "
            "(offline, or not downloaded); download it first, or give a local folder"
        ) from err
    guarded = getattr(pipeline_class, "scores_memorization", False)  # guarded classes do it themselves
    if looks_local(model) and not guarded:
        fingerprint_loaded(model, pipe.unet)
        adopt_edit_record(model, pipe.unet)  # an exported edited model keeps its original's identity
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def is_sdxl(model) -> bool:
    """Whether ``model`` is SDXL: a pipeline whose UNet takes SDXL's ``text_time`` micro-conditioning, or
    a folder or hub id whose ``model_index.json`` names an SDXL pipeline (``None``, the organism, is not)."""
    if model is None:
        return False
    if hasattr(model, "unet"):
        return getattr(model.unet.config, "addition_embed_type", None) == "text_time"
    index = Path(str(model)) / "model_index.json"
    name = None
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            name = data.get("_class_name") if isinstance(data, dict) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            name = None  # check_sd_folder reports it
    elif not looks_local(model):
        try:
            from diffusers import DiffusionPipeline

            name = DiffusionPipeline.load_config(str(model)).get("_class_name")
        except Exception:  # not reachable: from_pretrained gives the error
            name = None
    return isinstance(name, str) and "XL" in name


def stock_pipeline_class(model: str | os.PathLike | None):
    """diffusers' own pipeline class for ``model`` (what a trained folder is saved as)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if is_sdxl(model) else StableDiffusionPipeline
