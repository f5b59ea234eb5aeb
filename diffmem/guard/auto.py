"""From a model folder (or a pipeline) to diffmem's guarded pipeline, as diffusers' AutoPipeline maps a
folder to its class: SDXL's for an SDXL folder, SD's otherwise."""

from __future__ import annotations

import os

import torch

from diffmem.guard.pipeline import MemGuardMixin
from diffmem.guard.stable_diffusion import StableDiffusionMemGuardPipeline
from diffmem.guard.stable_diffusion_xl import StableDiffusionXLMemGuardPipeline
from diffmem.modelio import is_sdxl, load_pipeline

__all__ = ["as_guarded", "guarded_pipeline_class", "load_guarded"]


def guarded_pipeline_class(model: str | os.PathLike | None) -> type[MemGuardMixin]:
    """The guarded pipeline for ``model``: SDXL's when its ``model_index.json`` names an SDXL pipeline."""
    return StableDiffusionXLMemGuardPipeline if is_sdxl(model) else StableDiffusionMemGuardPipeline


def load_guarded(
    model: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    argument: str = "--model",
    allow_pickle: bool | None = None,
    progress: bool = True,
):
    """:func:`diffmem.modelio.load_pipeline` with the guarded class for ``model`` (default: the organism)."""
    return load_pipeline(
        model, guarded_pipeline_class(model), dtype, device, argument, allow_pickle, progress
    )


def as_guarded(pipe):
    """``pipe`` as diffmem's guarded pipeline (SDXL's for a pipeline with two text encoders), sharing its
    modules (``from_pipe``); a guarded pipeline is returned as it is."""
    if isinstance(pipe, MemGuardMixin):
        return pipe
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return (StableDiffusionXLMemGuardPipeline if sdxl else StableDiffusionMemGuardPipeline).from_pipe(pipe)
