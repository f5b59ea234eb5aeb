"""The detector protocol and its registry: every memorization detector scores prompts the same way.

A :class:`Detector` maps prompts to scores, one per generation (``[n_prompts, num_gens]``, higher = more
likely memorized). Generation ``j`` of the prompt with id ``i`` always starts from the noise
``diffmem.seeding.item_generator(seed, i, j)`` (:func:`diffmem.generation.initial_latents`), so every detector
sees the same starting noise, whatever the batch. ``unet_evals(num_inference_steps)`` is the cost per
generation in UNet evaluations (a classifier-free-guidance batch counts 2; a Jacobian-vector product
counts 2), as the harness reports it beside measured seconds.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from diffmem.generation import initial_latents
from diffmem.registry import Registry

__all__ = ["DETECTORS", "Detector", "available_detectors", "get_detector", "register_detector"]

BUILTIN_MODULES = (
    "diffmem.detectors.wen",
    "diffmem.detectors.attention_entropy",
    "diffmem.detectors.anisotropy",
    "diffmem.detectors.sharpness",
    "diffmem.detectors.bright_ending",
    "diffmem.detectors.broken_memories",
    "diffmem.detectors.dsm",
    "diffmem.detectors.hessian_difference",
)


class Detector(ABC):
    """Base class of memorization detectors (see the module docstring)."""

    #: registry name
    name: ClassVar[str] = ""
    #: the paper, for tables
    reference: ClassVar[str] = ""

    @abstractmethod
    def unet_evals(self, num_inference_steps: int) -> float:
        """UNet evaluations per generation."""

    @abstractmethod
    def score_latents(self, pipe, prompts: list[str], latents: torch.Tensor, settings: dict) -> torch.Tensor:
        """Scores ``[len(prompts) * num_gens]`` (prompt-major) for starting noise ``latents`` (before
        ``init_noise_sigma``); ``settings`` holds ``num_gens``, ``num_inference_steps``, ``guidance_scale``,
        ``height``, ``width`` and ``pipeline_kwargs``."""

    def config(self) -> dict[str, Any]:
        """The detector's settings, as recorded in results (keys are ``__init__`` arguments)."""
        return {"name": self.name}

    def key(self) -> str:
        """A file-safe name with the settings that differ from the defaults (``wen``, ``wen-steps=5``)."""
        params = inspect.signature(type(self).__init__).parameters
        parts = [self.name] + [
            f"{k}={v}" for k, v in self.config().items() if k in params and params[k].default != v
        ]
        return "-".join(parts).replace("/", "_").replace(" ", "")

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"

    def score(
        self,
        pipe,
        prompts: Sequence[str],
        *,
        num_gens: int = 4,
        seed: int = 0,
        item_ids: Sequence | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        batch_size: int = 8,
        progress: bool = True,
        height: int | None = None,
        width: int | None = None,
        **pipeline_kwargs,
    ) -> torch.Tensor:
        """Scores ``[len(prompts), num_gens]`` (float32, CPU); the row mean is the prompt's score.

        Generation ``j`` of prompt ``i`` starts from :func:`~diffmem.generation.initial_latents` of
        ``item_ids[i]`` (default: ``i``), so scores do not depend on ``batch_size``. ``height``, ``width``
        and ``pipeline_kwargs`` (e.g. a guarded pipeline's ``mitigation=``) reach ``score_latents`` in
        ``settings``.
        """
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts: expected a non-empty list of strings")
        if not isinstance(num_gens, int) or num_gens < 1:
            raise ValueError(f"num_gens: expected an integer >= 1, got {num_gens!r}")
        ids = list(range(len(prompts))) if item_ids is None else list(item_ids)
        if len(ids) != len(prompts):
            raise ValueError(f"item_ids: {len(ids)} ids for {len(prompts)} prompts (expected one per prompt)")
        settings = {
            "num_gens": num_gens,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "pipeline_kwargs": pipeline_kwargs,
        }
        out = torch.empty(len(prompts), num_gens)
        device, dtype = pipe._execution_device, pipe.unet.dtype
        old_bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)
        try:
            with tqdm(total=len(prompts), desc=self.name, unit="prompt", disable=not progress) as bar:
                for b in range(0, len(prompts), batch_size):
                    batch = list(prompts[b : b + batch_size])
                    latents = initial_latents(pipe, ids[b : b + batch_size], num_gens, seed, height, width)
                    latents = latents.to(device, dtype)
                    scores = self.score_latents(pipe, batch, latents, settings)
                    out[b : b + len(batch)] = scores.detach().float().cpu().view(len(batch), num_gens)
                    bar.update(len(batch))
        finally:
            pipe._progress_bar_config = old_bar
        return out


def step_window(steps: int, start: int = 0) -> tuple[int, int]:
    """``(steps, start)`` of a detector that reads the sampling steps ``start <= k < steps``, checked."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if not isinstance(start, int) or not 0 <= start < steps:
        raise ValueError(f"start: expected an integer 0 <= start < steps={steps}, got {start!r}")
    return steps, start


#: The registry of detectors.
DETECTORS = Registry("detector", Detector, BUILTIN_MODULES)


def register_detector(cls: type[Detector]) -> type[Detector]:
    """Class decorator: make ``cls`` available as ``get_detector(cls.name)``."""
    return DETECTORS.register(cls)


def available_detectors() -> list[str]:
    """Names of the registered detectors, sorted."""
    return DETECTORS.names()


def get_detector(spec: str | Detector, options: Mapping[str, Any] | None = None) -> Detector:
    """A detector from a registry name (built with ``options``) or a detector object."""
    return DETECTORS.create(spec, options)


def timestep_schedule(pipe, num_inference_steps: int) -> torch.Tensor:
    """The pipeline scheduler's timesteps for ``num_inference_steps`` (the scheduler is left set to them)."""
    pipe.scheduler.set_timesteps(num_inference_steps, device=pipe._execution_device)
    return pipe.scheduler.timesteps
