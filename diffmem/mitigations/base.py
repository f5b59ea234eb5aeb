"""The mitigation protocol and its registry: a new inference-time mitigation is one class.

The guarded pipelines flag images by their first-step noise gap, then hand the call to a
:class:`Mitigation`. Its :meth:`~Mitigation.plan` sees the whole prepared batch (:class:`GuardedBatch`:
per-image prompt embeddings, starting latents, flags, timesteps) and returns a
:class:`MitigationPlan`: what it changed in the batch's inputs (it may replace embeddings or latents of
the flagged images), a context that is entered around the stock denoising loop (hooks, processors;
leaving it undoes them, also on an error) and what it did to each image. Unflagged images must come
out exactly as without mitigation. A mitigation keeps no state of a call on the pipeline; what it
may cache across calls (NeMo's per-prompt neurons) lives on the mitigation object.

Register a class with :func:`register_mitigation`; ``mitigation="name"`` in a pipeline call builds
it with ``mitigation_options`` as keyword arguments (:func:`get_mitigation`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from diffmem.registry import Registry

__all__ = [
    "MITIGATIONS",
    "GuardedBatch",
    "Mitigation",
    "MitigationPlan",
    "available_mitigations",
    "get_mitigation",
    "register_mitigation",
]

#: Modules whose import registers the built-in mitigations (imported on the first registry lookup).
BUILTIN_MODULES = (
    "diffmem.mitigations.nemo",
    "diffmem.mitigations.embedding",
    "diffmem.mitigations.guidance",
    "diffmem.mitigations.attention",
    "diffmem.mitigations.initial_noise",
    "diffmem.mitigations.bright_ending",
    "diffmem.mitigations.pad_token",
    "diffmem.mitigations.guard",
)


@dataclass
class GuardedBatch:
    """One guarded call, prepared for a mitigation: every tensor has one row per image (prompt-major).

    Attributes:
        pipe: the pipeline (its UNet, scheduler, ...).
        prompts: one entry per prompt (``None`` where the call passed ``prompt_embeds``).
        prompt_index: image ``k`` belongs to ``prompts[prompt_index[k]]``.
        prompt_embeds, negative_prompt_embeds: ``[n, tokens, dim]``.
        latents: the starting noise as the stock ``latents=`` argument takes it (before the scheduler's
            ``init_noise_sigma``; :meth:`initial_latents` gives ``x_T``).
        timesteps: the call's schedule.
        guidance: whether the loop runs classifier-free guidance.
        added_cond, negative_added_cond: extra UNet conditioning per image (SDXL: ``text_embeds``,
            ``time_ids``), ``None`` for SD.
        first_step_scores: ``[n]`` first-step noise gaps; ``flagged``: ``score >= threshold``.
    """

    pipe: Any
    prompts: list[str | None]
    prompt_index: list[int]
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    latents: torch.Tensor
    timesteps: torch.Tensor
    guidance: bool
    threshold: float
    added_cond: dict[str, torch.Tensor] | None = None
    negative_added_cond: dict[str, torch.Tensor] | None = None
    first_step_scores: torch.Tensor | None = None
    flagged: list[bool] = field(default_factory=list)
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    #: the guarded pipeline's stock ``__call__`` on a (selected) batch: ``stock_call(batch, **call_kwargs)``
    stock_call: Callable[..., Any] | None = None
    #: the loop's guidance scale now (a ``callback_on_step_end`` may change it during the call)
    current_guidance_scale: Callable[[], float] | None = None

    @property
    def num_images(self) -> int:
        return self.prompt_embeds.shape[0]

    def initial_latents(self) -> torch.Tensor:
        """``x_T`` as the loop's first UNet call sees it before ``scale_model_input``."""
        return self.latents * self.pipe.scheduler.init_noise_sigma

    def run_stock(self, rows: list[int], **call_kwargs) -> Any:
        """The stock (unguarded) loop on images ``rows`` of this batch, with their prompts, conditioning and
        starting noise, and ``call_kwargs`` (e.g. ``output_type="latent"``)."""
        if self.stock_call is None:
            raise ValueError("this GuardedBatch has no stock call (it was not made by a guarded pipeline)")
        return self.stock_call(self.select(rows), **call_kwargs)

    def flagged_prompts(self) -> dict[int, list[int]]:
        """Prompt index -> the rows of its flagged images (prompts with no flagged image left out)."""
        out: dict[int, list[int]] = {}
        for k, flag in enumerate(self.flagged):
            if flag:
                out.setdefault(self.prompt_index[k], []).append(k)
        return out

    def select(self, rows: list[int]) -> GuardedBatch:
        """The batch of images ``rows`` only (prompts renumbered), e.g. to run the stock loop on them."""
        kept = sorted({self.prompt_index[k] for k in rows})
        renumber = {i: j for j, i in enumerate(kept)}

        def pick(cond):
            return None if cond is None else {k: v[rows] for k, v in cond.items()}

        return dataclasses.replace(
            self,
            prompts=[self.prompts[i] for i in kept],
            prompt_index=[renumber[self.prompt_index[k]] for k in rows],
            prompt_embeds=self.prompt_embeds[rows],
            negative_prompt_embeds=self.negative_prompt_embeds[rows],
            latents=self.latents[rows],
            added_cond=pick(self.added_cond),
            negative_added_cond=pick(self.negative_added_cond),
            first_step_scores=None if self.first_step_scores is None else self.first_step_scores[rows],
            flagged=[self.flagged[k] for k in rows] if self.flagged else [],
        )

    def unet_kwargs(self, rows=None, *, negative: bool = False) -> dict[str, Any]:
        """Extra keyword arguments of a UNet call on ``rows`` (all images when ``None``) of one branch."""
        cond = self.negative_added_cond if negative else self.added_cond
        if not cond:
            return {}
        return {"added_cond_kwargs": {k: v if rows is None else v[rows] for k, v in cond.items()}}

    def cfg_unet_kwargs(self, rows=None) -> dict[str, Any]:
        """The same for a classifier-free-guidance batch ``[negative rows, conditional rows]``."""
        if not self.added_cond:
            return {}
        neg = self.unet_kwargs(rows, negative=True)["added_cond_kwargs"]
        pos = self.unet_kwargs(rows)["added_cond_kwargs"]
        return {"added_cond_kwargs": {k: torch.cat([neg[k], pos[k]]) for k in pos}}


@dataclass
class MitigationPlan:
    """What a mitigation does to one call.

    ``context`` is entered around the stock loop and undoes the change when it closes; ``report``
    holds per-image updates merged into ``output.mitigations[k]`` (``action`` names what was done,
    ``seconds`` the time it added); the batch's tensors may have been replaced in place.
    """

    context: contextlib.AbstractContextManager = field(default_factory=contextlib.nullcontext)
    report: dict[int, dict[str, Any]] = field(default_factory=dict)


class Mitigation(ABC):
    """Base class of inference-time mitigations (see the module docstring for the contract)."""

    #: registry name (``mitigation="name"``)
    name: ClassVar[str] = ""
    #: what the method changes, for tables (``"weights"``, ``"embedding"``, ``"guidance"``, ...)
    kind: ClassVar[str] = ""

    @abstractmethod
    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        """Change the flagged images of ``batch``; unflagged ones must stay as without mitigation."""

    def config(self) -> dict[str, Any]:
        """The mitigation's settings, as recorded in reports (override to add more)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


def register_mitigation(cls: type[Mitigation]) -> type[Mitigation]:
    """Class decorator: make ``cls`` available as ``mitigation=cls.name``."""
    return MITIGATIONS.register(cls)


def available_mitigations() -> list[str]:
    """Names of the registered mitigations, sorted."""
    return MITIGATIONS.names()


def get_mitigation(
    spec: str | Mitigation | None, options: Mapping[str, Any] | None = None
) -> Mitigation | None:
    """A mitigation object from a registry name (built with ``options``) or an object; ``None`` stays ``None``."""
    if spec is None:
        if options:
            raise ValueError("mitigation_options given without a mitigation")
        return None
    return MITIGATIONS.create(spec, options)


#: The registry of inference-time mitigations.
MITIGATIONS = Registry("mitigation", Mitigation, BUILTIN_MODULES)
