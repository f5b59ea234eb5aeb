"""What the guarded SD and SDXL pipelines share: the scored call, calibration, mitigation, edits, save/load.

A guarded pipeline is ``class X(MemGuardMixin, <stock diffusers pipeline>)`` with a ``__call__`` built by
:func:`guarded_call`; the stock denoising loop runs untouched. Around it the mixin

* reads Wen et al.'s noise gap at every UNet call through a forward hook (free under classifier-free
  guidance, one extra unconditional call per step without it) and returns per-image scores and flags
  (:class:`GuardOutputFields`); or, with ``memorization_detector=``, a registry detector that reads only
  the loop's own tensors (:class:`~diffmem.detectors.trajectory.LoopDetector`: ``broken-memories``,
  ``dsm``) through the same kind of hook and a ``callback_on_step_end`` composed with the caller's;
* takes the flag threshold from the call, from ``pipe.memorization_threshold``, or from the model's
  calibration (:class:`~diffmem.guard.calibration.GuardCalibration`), which is only applied when the
  call's settings match it;
* runs a mitigation object (:mod:`diffmem.mitigations`) on the images flagged at the first step;
* loads an edit (``NeuronSet``, ``WeightMask``) into the UNet with :meth:`MemGuardMixin.load_edit`;
* saves a folder that stock diffusers loads (``model_index.json`` names the stock class) with the
  calibration beside it.

A pipeline family implements :meth:`MemGuardMixin._guard_unconditional`,
:meth:`MemGuardMixin._guard_batch` and :meth:`MemGuardMixin._guard_call_updates` (how it encodes prompts
and what extra UNet conditioning it has).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, fields, make_dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from diffmem.attention import ATTENTION_CHOICES, attention_processors
from diffmem.detectors.trajectory import (
    LoopDetector,
    LoopReader,
    detector_from_record,
    detector_record,
    loop_detector,
)
from diffmem.edits import EditLoaderMixin, adopt_edit_record
from diffmem.fingerprint import fingerprint_loaded, fingerprint_problem, model_fingerprint
from diffmem.guard.calibration import CALIBRATION_FILE, GuardCalibration
from diffmem.guard.signature import extended_call, keyword
from diffmem.hooks.noise import capture_noise_gap
from diffmem.io import atomic_write_json
from diffmem.mitigations import get_mitigation
from diffmem.mitigations.base import GuardedBatch
from diffmem.modelio import check_sd_folder, looks_local, model_resolution
from diffmem.scores.noise_gap import window_mean

__all__ = [
    "GUARD_PARAMETERS",
    "MemGuardMixin",
    "check_memorization_threshold",
    "check_prompt",
    "check_window",
    "guarded_call",
    "guarded_output_class",
]

_UNSET = object()

#: The guard's own keyword arguments of ``__call__`` (after the stock ones).
GUARD_PARAMETERS = [
    keyword("memorization_threshold", None, "float | None"),
    keyword("memorization_window", None, "tuple[int, int | None] | None"),
    keyword("memorization_detector", None, "str | diffmem.detectors.trajectory.LoopDetector | None"),
    keyword("return_step_scores", False, "bool"),
    keyword("mitigation", None, "str | diffmem.mitigations.Mitigation | None"),
    keyword("mitigation_threshold", None, "float | None"),
    keyword("mitigation_options", None, "dict | None"),
    keyword("attention", None, "str | None"),
]

GUARD_DOC = r"""Generate images exactly as the stock pipeline does and score each for memorization.

Every stock argument is accepted and passed on unchanged (listed below), plus these keyword arguments:

Args:
    memorization_threshold (`float`, *optional*):
        Flag an image as memorized when its score is ``>=`` this (finite, ``>= 0``). Default:
        ``pipe.memorization_threshold`` if set, else the model's calibration
        (``diffmem_calibration.json`` in its folder) when the call's window, schedule, resolution
        (and, past the first step, guidance scale) match it; otherwise ``memorized`` is ``None`` and
        a warning says which setting differs.
    memorization_window (`tuple[int, int | None]`, *optional*):
        The UNet calls ``[start, end)`` whose gaps are averaged (``end=None``: to the last one).
        Default: the calibration's window, or ``(0, None)`` without one. ``(0, 1)`` is Wen et
        al.'s first-step score. PNDM makes one more UNet call than ``num_inference_steps``.
    memorization_detector (`str` or `diffmem.detectors.trajectory.LoopDetector`, *optional*):
        The score: ``"wen"`` (the noise gap below), or a registered detector that reads only what the loop
        computes anyway, ``"broken-memories"`` or ``"dsm"`` (``diffmem.detectors.trajectory.loop_detector_names()``;
        an object such as ``get_detector("dsm", {"step": 0})`` for other settings): the same score as the
        registry's detector for the same noise, at no extra UNet call. Default: ``pipe.memorization_detector``
        if set, else the calibration's detector, else ``"wen"``. A calibration made for another detector is
        not applied (``memorized`` is ``None``, a warning says so). With a detector other than Wen's,
        ``memorization_window`` and ``return_step_scores`` do not apply and a mitigation needs its own
        ``mitigation_threshold`` (it still picks images by the first step's noise gap, before the loop).
    return_step_scores (`bool`, defaults to ``False``):
        Also return ``memorization_step_scores`` ``[n_images, n_unet_calls]``.
    mitigation (`str` or `diffmem.mitigations.Mitigation`, *optional*):
        A registered name (``"nemo"``, ``"embedding"``, see
        ``diffmem.mitigations.available_mitigations()``) built with ``mitigation_options``, or a
        mitigation object. Images whose first-step score is ``>= mitigation_threshold`` (default: the
        flag threshold) are mitigated; the others come out as without mitigation.
        ``output.mitigations`` says what was done to each image.
    mitigation_threshold (`float`, *optional*): the first-step threshold that selects images to mitigate.
    mitigation_options (`dict`, *optional*): keyword arguments of the named mitigation's class.
    attention (`str`, *optional*):
        ``None`` keeps the model's attention processors (bit-identical to the stock pipeline);
        ``"auto"`` uses xformers on CUDA when installed, PyTorch SDPA otherwise; ``"sdpa"``,
        ``"xformers"``, ``"naive"`` force one. The original processors are restored after the call.

The score: under classifier-free guidance the UNet's batch is ``[negative/empty, text]`` and the gap
``||eps_text - eps_negative||_2`` costs no extra UNet call (with a negative prompt it is measured
against the negative prompt, as the sampler uses it); without guidance one extra unconditional call
per step is made with the empty-prompt conditioning. For v-prediction models the gap of the UNet
outputs is turned into the noise-prediction gap (``sqrt(alpha_bar_t)`` times the v gap).

Returns:
    The stock output dataclass extended with ``memorization_scores``, ``memorized``,
    ``memorization_threshold`` (the one applied), ``memorization_step_scores`` and ``mitigations``;
    with ``return_dict=False`` exactly the stock tuple.
"""


# ------------------------------------------------------------------------------------------ checks
def check_memorization_threshold(value, argument: str = "memorization_threshold") -> float | None:
    """``None`` or a finite float >= 0; anything else raises a ``ValueError`` naming ``argument``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{argument}: expected a finite number >= 0 or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{argument}: expected a finite number >= 0 or None, got {value}")
    return value


def check_prompt(prompt, prompt_embeds) -> None:
    """A clear error for a missing, empty or malformed prompt (the stock pipeline's messages are vaguer)."""
    if prompt is None:
        if prompt_embeds is None:
            raise ValueError(
                "prompt: expected a non-empty string or list of strings (or pass prompt_embeds), got None"
            )
        return
    if prompt_embeds is not None:
        raise ValueError("prompt: pass either prompt or prompt_embeds, not both")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(
            f"prompt: expected a non-empty string or a non-empty list of strings, got {prompt!r}"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            where = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
            raise ValueError(f"{where}: expected a non-empty string, got {p!r}")


def check_window(window, num_steps: int) -> tuple[int, int]:
    """``(start, end)`` with ``0 <= start < end <= num_steps`` (``end=None`` means ``num_steps``)."""
    try:
        start, end = window
    except (TypeError, ValueError):
        raise ValueError(f"memorization_window: expected (start, end), got {window!r}") from None
    end = num_steps if end is None else end
    ok = all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end))
    if not ok or not 0 <= start < end <= num_steps:
        raise ValueError(
            f"memorization_window: expected integers 0 <= start < end <= {num_steps} (the number of "
            f"denoising steps), got {tuple(window)!r}"
        )
    return start, end


# ------------------------------------------------------------------------------------------ output
@dataclass
class GuardOutputFields:
    """The fields a guarded pipeline adds to the stock output dataclass.

    Args:
        memorization_scores (`list[float]`): the detector's score of each image (Wen et al.'s noise gap by
            default), in the order of ``images``; NaN where the loop stopped before the steps it reads.
        memorized (`list[bool]` or `None`): ``score >= memorization_threshold`` per image; ``None``
            when no threshold applies to the call.
        memorization_threshold (`float` or `None`): the threshold applied.
        memorization_step_scores (`torch.Tensor` or `None`): ``[n_images, n_unet_calls]`` per-step
            gaps, with ``return_step_scores=True``.
        mitigations (`list[dict]` or `None`): per image, with a mitigation: ``first_step_score``,
            ``flagged``, ``action`` (``"none"`` or the mitigation's name), ``seconds`` it added and the
            mitigation's own entries.
    """

    memorization_scores: list[float] | None = None
    memorized: list[bool] | None = None
    memorization_threshold: float | None = None
    memorization_step_scores: torch.Tensor | None = None
    mitigations: list[dict] | None = None


def guarded_output_class(stock_output: type, name: str, module: str) -> type:
    """``stock_output`` (a diffusers output dataclass) extended with :class:`GuardOutputFields`."""
    from dataclasses import field

    extra = [(f.name, f.type, field(default=None)) for f in fields(GuardOutputFields)]
    doc = (stock_output.__doc__ or "").rstrip() + "\n\n" + (GuardOutputFields.__doc__ or "")
    cls = make_dataclass(name, extra, bases=(stock_output,), namespace={"__doc__": doc})
    cls.__module__ = module
    return cls


def guarded_call(stock_pipeline: type) -> Any:
    """The ``__call__`` of a guarded pipeline over ``stock_pipeline`` (its signature plus the guard's)."""
    return extended_call(
        stock_pipeline.__call__, GUARD_PARAMETERS, MemGuardMixin._guarded_call, doc=GUARD_DOC
    )


# ------------------------------------------------------------------------------------------ the mixin
class MemGuardMixin(EditLoaderMixin):
    """Shared behaviour of the guarded pipelines (put it before the stock class in the bases).

    Attributes:
        memorization_threshold (`float` or `None`): a threshold for every call that passes none; it
            takes precedence over the calibration and is applied without condition checks, and is not
            saved (``save_pretrained`` warns; :meth:`set_guard_threshold` keeps a threshold with its
            conditions as the calibration, which is saved).
        memorization_detector (`str`, `LoopDetector` or `None`): the detector of every call that names
            none (``None``: the calibration's, else ``"wen"``); not saved (the calibration's detector is).
        calibration (`GuardCalibration` or `None`): read from the model folder by ``from_pretrained``.
    """

    #: marks diffmem's guarded pipelines for the layers below the guard, which cannot import this class:
    #: they score their own loop (``diffmem.detectors.wen.is_guarded``, ``diffmem.modelio.load_pipeline``)
    scores_memorization: ClassVar[bool] = True
    #: the diffusers pipeline class this one wraps (saved folders name it in ``model_index.json``)
    stock_pipeline_class: ClassVar[type]
    #: the output dataclass
    output_class: ClassVar[type]
    memorization_threshold: float | None = None
    memorization_detector: str | LoopDetector | None = None

    # ----------------------------------------------------------------------------- calibration
    @property
    def calibration(self) -> GuardCalibration | None:
        value = self.__dict__.get("_diffmem_calibration", _UNSET)
        if value is _UNSET:  # built by diffusers itself (custom_pipeline=): read the folder it came from
            value = self._read_calibration(self.name_or_path)
            self.__dict__["_diffmem_calibration"] = value
        return value

    @calibration.setter
    def calibration(self, value: GuardCalibration | None) -> None:
        if value is not None and not isinstance(value, GuardCalibration):
            raise TypeError(f"calibration: expected a GuardCalibration or None, got {type(value).__name__}")
        self.__dict__["_diffmem_calibration"] = value

    def set_guard_threshold(
        self,
        threshold: float,
        *,
        num_inference_steps: int,
        window: tuple[int, int] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float | None = None,
        data: str | None = None,
        detector: str | LoopDetector = "wen",
    ) -> GuardCalibration:
        """Flag later calls at ``threshold`` under the conditions it was chosen for, kept as the model's
        calibration: ``save_pretrained`` writes it and ``from_pretrained`` reads it back, and a call under
        other conditions is refused as with any calibration. The scheduler is the pipeline's, the size
        by default its default one; ``guidance_scale`` is needed for a window past the first step.
        ``detector`` is the score the threshold is for (``memorization_detector``); ``window`` (default
        ``(0, 1)``) is Wen's only, and every other detector needs ``guidance_scale`` (it reads the guided loop).
        (``pipe.memorization_threshold = t`` instead applies ``t`` to every call and is not saved.)"""
        threshold = check_memorization_threshold(threshold, "threshold")
        if threshold is None:
            raise ValueError(
                "threshold: expected a number, got None (set pipe.calibration = None to drop it)"
            )
        reader = loop_detector(detector, "detector")
        if reader is not None:
            if window is not None:
                raise ValueError(
                    f"window: the noise gap's (detector='wen'); {reader.name!r} reads the first "
                    f"{reader.loop_steps()} sampling steps"
                )
            window = (0, reader.loop_steps())
        start, end = check_window((0, 1) if window is None else window, num_inference_steps)
        if (end > 1 or reader is not None) and guidance_scale is None:
            raise ValueError(
                f"guidance_scale: needed with window {(start, end)} and detector {detector_record(reader)['name']!r} "
                "(past the first step's noise gap the score depends on it)"
            )
        height, width = self.image_size(height, width)
        self.calibration = GuardCalibration(
            memorization_threshold=threshold,
            memorization_window=(start, end),
            num_inference_steps=num_inference_steps,
            scheduler=type(self.scheduler).__name__,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
            model_fingerprint=model_fingerprint(self.unet),
            data=data,
            memorization_detector=detector_record(reader),
            extra={"set_by": "set_guard_threshold"},
        )
        return self.calibration

    def load_calibration(self, path: str | os.PathLike) -> GuardCalibration:
        """Read a calibration (a model folder or the JSON file) and use it for later calls."""
        calibration = GuardCalibration.from_pretrained(path)
        if calibration is None:
            raise FileNotFoundError(f"{path}: no {CALIBRATION_FILE} there")
        self.calibration = self._checked_calibration(calibration, str(path))
        return self.calibration

    def _checked_calibration(self, calibration: GuardCalibration | None, source: str):
        """``None`` (with a warning) for a calibration measured on another UNet."""
        if calibration is None or calibration.model_fingerprint is None:
            return calibration

        problem = fingerprint_problem(
            calibration.model_fingerprint,
            self.unet,
            f"{source}: the calibration",
            "not used (recalibrate with `diffmem detect --labels COLUMN --save-calibration MODEL_DIR`)",
        )
        if problem is not None:
            logger().warning(problem)
            return None
        return calibration

    def _read_calibration(self, name_or_path) -> GuardCalibration | None:
        if not name_or_path:
            return None
        path = Path(str(name_or_path))
        if path.is_dir():
            return self._checked_calibration(GuardCalibration.from_pretrained(path), str(path))
        if str(name_or_path).count("/") == 1 and not path.exists():  # a hub id: the file if it is there
            try:
                from huggingface_hub import hf_hub_download

                file = hf_hub_download(str(name_or_path), CALIBRATION_FILE)
            except Exception:  # no such file in the repository, or offline without it in the cache
                return None
            return self._checked_calibration(GuardCalibration.from_pretrained(file), str(name_or_path))
        return None

    # ----------------------------------------------------------------------------- save / load
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The stock ``from_pretrained`` (any SD folder or hub id), plus: a local folder is checked
        first (``diffmem.modelio.check_sd_folder``: an error names the folder, the component and what
        it lacks; pickle weights only with ``use_safetensors=False``) and its calibration is read."""

        path = str(pretrained_model_name_or_path)
        if looks_local(path):
            # pickle weights only when asked for explicitly (use_safetensors=False, or diffmem --allow-pickle)
            explicit = True if kwargs.get("use_safetensors") is False else None
            check_sd_folder(
                path, argument="pretrained_model_name_or_path", pipeline_class=cls, allow_pickle=explicit
            )
            if explicit:  # opted in: each component loads its safetensors, or its pickle where it has none
                kwargs["use_safetensors"] = None
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if looks_local(path):
            fingerprint_loaded(path, pipe.unet)  # hashed once per set of weight files, then remembered
            adopt_edit_record(path, pipe.unet)  # an exported edited model keeps its original's identity
        pipe.__dict__["_diffmem_calibration"] = pipe._read_calibration(path)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """The stock ``from_pipe``; a guarded source also passes on its calibration and threshold."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if isinstance(pipeline, MemGuardMixin):
            pipe.calibration = pipeline.calibration
            for name in ("memorization_threshold", "memorization_detector"):
                if name in pipeline.__dict__:
                    setattr(pipe, name, getattr(pipeline, name))
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The stock ``save_pretrained``, with ``model_index.json`` naming the stock pipeline class (so
        stock diffusers loads the folder) and the calibration written beside it."""

        threshold = self.__dict__.get("memorization_threshold")
        if threshold is not None:
            kept = (
                f"the saved folder keeps the calibration at {self.calibration.memorization_threshold}"
                if self.calibration is not None
                else "the saved folder flags nothing"
            )
            warnings.warn(
                f"pipe.memorization_threshold = {threshold} is not saved by save_pretrained ({kept}): a "
                "threshold holds only under the window, steps, scheduler and resolution it was chosen for; "
                f"pipe.set_guard_threshold({threshold}, num_inference_steps=...) keeps it with them",
                UserWarning,
                stacklevel=2,
            )
        detector = self.__dict__.get("memorization_detector")
        if detector is not None:
            warnings.warn(
                f"pipe.memorization_detector = {detector!r} is not saved by save_pretrained (the saved folder "
                "scores with its calibration's detector); pipe.set_guard_threshold(..., detector=...) keeps it "
                "with its threshold",
                UserWarning,
                stacklevel=2,
            )
        super().save_pretrained(save_directory, *args, **kwargs)
        index_path = Path(save_directory) / "model_index.json"
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["_class_name"] = self.stock_pipeline_class.__name__
        atomic_write_json(index_path, index)
        if self.calibration is not None:
            self.calibration.save_pretrained(save_directory)
        self._save_edit_record(save_directory)  # loads keep this model's identity

    # ----------------------------------------------------------------------------- family hooks
    def _guard_unconditional(self, call: dict) -> tuple[torch.Tensor, dict | None]:
        """Empty-prompt conditioning for the extra unconditional call (``[1, tokens, dim]``, added cond)."""
        raise NotImplementedError

    def _guard_batch(self, call: dict, guidance: bool, threshold: float):
        """The call as a :class:`~diffmem.mitigations.GuardedBatch` (prompts encoded, latents drawn)."""
        raise NotImplementedError

    def _guard_call_updates(self, batch) -> dict:
        """The stock arguments that make the loop run on ``batch``'s tensors."""
        raise NotImplementedError

    def _new_batch(self, call: dict, cond, neg, guidance: bool, threshold: float, **conditioning):
        """The :class:`~diffmem.mitigations.GuardedBatch` of encoded prompts ``cond``/``neg`` (one row per image)."""
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

        n_per = call["num_images_per_prompt"] or 1
        n = cond.shape[0]
        prompt = call["prompt"]
        prompts = (
            [prompt]
            if isinstance(prompt, str)
            else list(prompt)
            if prompt is not None
            else [None] * (n // n_per)
        )
        timesteps, _ = retrieve_timesteps(
            self.scheduler,
            call["num_inference_steps"],
            self._execution_device,
            call["timesteps"],
            call["sigmas"],
        )
        return GuardedBatch(
            pipe=self,
            prompts=prompts,
            prompt_index=[k // n_per for k in range(n)],
            prompt_embeds=cond,
            negative_prompt_embeds=neg,
            latents=self._draw_latents(call, n, cond.dtype),
            timesteps=timesteps,
            guidance=guidance,
            threshold=threshold,
            num_inference_steps=call["num_inference_steps"],
            guidance_scale=float(call["guidance_scale"]),
            stock_call=self._stock_call,
            current_guidance_scale=lambda: self._guidance_scale,
            **conditioning,
        )

    def _stock_call(self, batch, **call_kwargs):
        """The stock ``__call__`` on ``batch`` (its conditioning and noise), for a mitigation that needs an
        unguarded run (:meth:`GuardedBatch.run_stock`)."""
        return type(self).stock_pipeline_class.__call__(
            self, **self._guard_call_updates(batch), **call_kwargs
        )

    @staticmethod
    def _refuse_ip_adapter(call: dict) -> None:
        if call.get("ip_adapter_image") is not None or call.get("ip_adapter_image_embeds") is not None:
            raise ValueError("mitigation: IP-Adapter inputs are not supported with a mitigation")

    def image_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` in pixels of a call with these arguments (the stock default: the UNet's size)."""

        return model_resolution(self, height, width)

    def _draw_latents(self, call: dict, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The loop's starting noise before ``init_noise_sigma`` (as the stock ``prepare_latents`` draws it)."""
        from diffusers.utils.torch_utils import randn_tensor

        height, width = self.image_size(call.get("height"), call.get("width"))
        shape = (
            n,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        generator = call["generator"]
        if isinstance(generator, list) and len(generator) != n:
            raise ValueError(
                f"generator: {len(generator)} generators for {n} images (expected one per image)"
            )
        if call["latents"] is not None:
            return call["latents"].to(self._execution_device)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=dtype)

    # ----------------------------------------------------------------------------- the call
    def _num_steps(self, call: dict) -> int:
        if call.get("timesteps") is not None:
            return len(call["timesteps"])
        if call.get("sigmas") is not None:
            return len(call["sigmas"])
        return call["num_inference_steps"]

    def _resolve_detector(self, explicit) -> LoopDetector | None:
        """The call's detector (``None``: Wen's noise gap): the call's, ``pipe.memorization_detector``, the
        calibration's, else Wen's."""
        if explicit is not None:
            return loop_detector(explicit)
        if self.memorization_detector is not None:
            return loop_detector(self.memorization_detector, "pipe.memorization_detector")
        if self.calibration is not None:
            return detector_from_record(self.calibration.detector, "the calibration's memorization_detector")
        return None

    def _check_loop_detector(self, detector: LoopDetector, own: dict, num_steps: int) -> None:
        """Refuse the settings a detector other than Wen's does not have, and a loop it cannot read."""
        name = detector.name
        for setting in ("memorization_window", "return_step_scores"):
            if own[setting] not in (None, False):
                raise ValueError(
                    f"{setting}: a setting of Wen's noise gap (memorization_detector='wen'), not of {name!r}, "
                    f"which reads the first {detector.loop_steps()} sampling steps"
                )
        order = getattr(self.scheduler, "order", 1)
        if order != 1:
            raise ValueError(
                f"memorization_detector={name!r}: reads one UNet call per sampling step; "
                f"{type(self.scheduler).__name__} makes {order}"
            )
        if detector.loop_steps() > num_steps:
            raise ValueError(
                f"memorization_detector={name!r}: reads the first {detector.loop_steps()} sampling steps; "
                f"num_inference_steps={num_steps}"
            )

    def _resolve_threshold(
        self, explicit, window, num_steps, call, guidance, detector=None
    ) -> tuple[float | None, str | None]:
        """The flag threshold of a call and, when the calibration was refused, why."""
        if explicit is not None:
            return explicit, None
        if self.memorization_threshold is not None:
            return check_memorization_threshold(
                self.memorization_threshold, "pipe.memorization_threshold"
            ), None
        calibration = self.calibration
        if calibration is None:
            return None, None
        height, width = self.image_size(call.get("height"), call.get("width"))
        negative = guidance and any(
            call.get(k) is not None
            for k in ("negative_prompt", "negative_prompt_embeds", "negative_prompt_2")
        )
        reason = calibration.mismatch(
            window=window,
            num_inference_steps=num_steps,
            scheduler=type(self.scheduler).__name__,
            height=height,
            width=width,
            guidance_scale=float(call["guidance_scale"]),
            negative_prompt=negative,
            detector=detector_record(detector),
        )
        if reason is not None:
            return None, reason
        return calibration.memorization_threshold, None

    def _guarded_call(self, call: dict, own: dict, extra: dict):

        # 1. check the inputs the guard relies on (the stock pipeline checks the rest)
        mitigation = get_mitigation(own["mitigation"], own["mitigation_options"])
        if own["attention"] not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention={own['attention']!r}: expected one of {', '.join(map(repr, ATTENTION_CHOICES))}"
            )
        check_prompt(call["prompt"], call["prompt_embeds"])
        explicit = check_memorization_threshold(own["memorization_threshold"])
        num_steps = self._num_steps(call)
        detector = self._resolve_detector(own["memorization_detector"])
        window = own["memorization_window"]
        if detector is not None:
            self._check_loop_detector(detector, own, num_steps)
            window = (0, detector.loop_steps())
        elif window is None:
            calibrated = self.calibration is not None and self.calibration.detector["name"] == "wen"
            window = self.calibration.memorization_window if calibrated else (0, None)
        start, end = check_window(window, num_steps)
        all_calls = window[1] is None  # to the last UNet call, also PNDM's extra one
        guidance = call["guidance_scale"] > 1 and self.unet.config.time_cond_proj_dim is None
        threshold, refused = self._resolve_threshold(
            explicit, (start, end), num_steps, call, guidance, detector
        )
        if refused is not None and refused not in self.__dict__.setdefault("_diffmem_warned", set()):
            self.__dict__["_diffmem_warned"].add(refused)  # once per pipeline and reason
            logger().warning(
                f"the model's calibration is not applied to this call: {refused}; memorized is None "
                "(pass memorization_threshold= to flag with a threshold of your own)"
            )

        # 2. how the gap is read: the CFG halves, or an extra unconditional call with the empty prompt
        uncond_embeds = uncond_added = None
        if not guidance:
            uncond_embeds, uncond_added = self._guard_unconditional(call)
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)

        # 3. the upstream loop with processors, mitigation and the capture hook in place; all are
        #    removed when the call ends or fails
        report = context = None
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_processors(self.unet, own["attention"]))
            if mitigation is not None:  # planned first: its own UNet calls are not sampling steps
                mthreshold = check_memorization_threshold(own["mitigation_threshold"], "mitigation_threshold")
                if mthreshold is None and detector is not None:
                    raise ValueError(
                        f"mitigation_threshold: needed with memorization_detector={detector.name!r}: the images "
                        "to mitigate are picked before the loop by the first step's noise gap, on another scale "
                        "than the flag's threshold"
                    )
                mthreshold = threshold if mthreshold is None else mthreshold
                if mthreshold is None:
                    why = f" (the model's calibration does not fit: {refused})" if refused else ""
                    raise ValueError(
                        f"mitigation={mitigation.name!r} needs memorization_threshold, mitigation_threshold "
                        f"or a model calibration that fits the call{why}"
                    )
                report, context = self._plan_mitigation(mitigation, call, guidance, mthreshold)
            # the capture hook goes on before the mitigation's hooks, so it reads the UNet's own output
            # (a mitigation that rewrites the output, e.g. delayed guidance, does not change the score)
            if detector is None:
                record = stack.enter_context(
                    capture_noise_gap(
                        self.unet,
                        guidance=guidance,
                        uncond_embeds=uncond_embeds,
                        uncond_added_cond=uncond_added,
                        prediction_type=prediction_type,
                        alphas_cumprod=alphas_cumprod,
                    )
                )
            else:  # the detector's steps: the UNet's calls and, after each step, the latents
                reader = stack.enter_context(
                    LoopReader(self.scheduler, detector.loop_steps()).reading(self.unet)
                )
                call.update(step_reading_callback(call, reader))
            if context is not None:
                stack.enter_context(context)
            output = super().__call__(**call, **extra)

        # 4. per-image scores and flags (with return_dict=False: the stock tuple, nothing added)
        if not call["return_dict"]:
            return output
        n_images = len(output.images)
        if detector is None:
            step_scores = record.as_tensor()
            if step_scores.numel() == 0:
                step_scores = torch.zeros(n_images, 0)
            scores = [float(s) for s in window_mean(step_scores, start, None if all_calls else end)]
        else:
            path = reader.trajectory(n_images)
            scores = [math.nan] * n_images if path is None else detector.score_trajectory(path).tolist()
        return self.output_class(
            **{f.name: getattr(output, f.name) for f in fields(output)},
            memorization_scores=scores,
            memorized=None if threshold is None else [s >= threshold for s in scores],
            memorization_threshold=threshold,
            memorization_step_scores=step_scores if own["return_step_scores"] else None,
            mitigations=report,
        )

    def _plan_mitigation(self, mitigation, call: dict, guidance: bool, threshold: float):
        """Flag images at the first step, let ``mitigation`` plan, rewrite ``call``; (report, context)."""
        batch = self._guard_batch(call, guidance, threshold)
        start = time.perf_counter()
        batch.first_step_scores = first_step_gaps(batch)
        check_seconds = (time.perf_counter() - start) / batch.num_images
        batch.flagged = [bool(g >= threshold) for g in batch.first_step_scores]
        plan = mitigation.plan(batch)
        report = []
        for k, (gap, flag) in enumerate(zip(batch.first_step_scores, batch.flagged)):
            row = {
                "first_step_score": float(gap),
                "flagged": flag,
                "action": "none",
                "seconds": check_seconds,
            }
            update = dict(plan.report.get(k, {}))
            row["seconds"] += update.pop("seconds", 0.0)
            row.update(update)
            report.append(row)
        call.update(self._guard_call_updates(batch))
        return report, plan.context


def step_reading_callback(call: dict, reader: LoopReader) -> dict:
    """The call's ``callback_on_step_end`` (and tensor inputs) with ``reader`` given each step's latents after
    the caller's own callback (a function, a ``PipelineCallback`` or ``MultiPipelineCallbacks``) has run."""
    own = call["callback_on_step_end"]
    if isinstance(own, (PipelineCallback, MultiPipelineCallbacks)):
        inputs = list(own.tensor_inputs)
    else:
        inputs = list(call["callback_on_step_end_tensor_inputs"] or [])
    if "latents" not in inputs:
        inputs.append("latents")

    def callback(pipe, i, t, callback_kwargs):
        out = (own(pipe, i, t, callback_kwargs) or {}) if own is not None else {}
        reader.on_step(i, out.get("latents", callback_kwargs["latents"]))
        return out

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": inputs}


@torch.no_grad()
def first_step_gaps(batch) -> torch.Tensor:
    """Per-image noise gap at the first timestep, read by the pipeline's own capture hook (``[n]``, CPU)."""

    pipe = batch.pipe
    t0 = batch.timesteps[0]
    x = pipe.scheduler.scale_model_input(batch.initial_latents(), t0)
    cond, neg = batch.prompt_embeds, batch.negative_prompt_embeds
    neg_added = batch.negative_added_cond
    with capture_noise_gap(
        pipe.unet,
        guidance=batch.guidance,
        uncond_embeds=neg,
        uncond_added_cond={"text_embeds": neg_added["text_embeds"]} if neg_added else None,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        alphas_cumprod=getattr(pipe.scheduler, "alphas_cumprod", None),
    ) as record:
        if batch.guidance:
            pipe.unet(
                torch.cat([x, x]), t0, encoder_hidden_states=torch.cat([neg, cond]), **batch.cfg_unet_kwargs()
            )
        else:
            pipe.unet(x, t0, encoder_hidden_states=cond, **batch.unet_kwargs())
    return record.as_tensor()[:, 0]


def logger() -> logging.Logger:
    return logging.getLogger("diffmem.guard")
