"""A drop-in Stable Diffusion pipeline that scores every image for training-data memorization.

``StableDiffusionMemGuardPipeline`` is ``StableDiffusionPipeline`` with one wrapper around its
``__call__``: a forward hook on the UNet reads the noise predictions of the sampling loop and turns
them into Wen et al.'s memorization score (ICLR 2024, "Detecting, Explaining, and Mitigating
Memorization in Diffusion Models"):

    score(image) = mean_{start <= k < end} || eps(x_k, t_k, c) - eps(x_k, t_k, empty) ||_2

where ``k`` counts the UNet calls of the loop (one per entry of the scheduler's timesteps). Under
classifier-free guidance both predictions are already in the loop's batch, so the score costs no
extra UNet call; with guidance off, the hook runs one extra unconditional call per step. The
denoising loop itself is the upstream one, untouched: with ``mitigation=None`` the images are
bit-identical to ``StableDiffusionPipeline``'s for the same inputs and generator.

Use it like the stock pipeline::

    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    pipe = StableDiffusionMemGuardPipeline.from_pretrained("path/to/sd")   # or .from_pipe(stock_pipe)
    out = pipe("a prompt", memorization_threshold=3.0)
    out.images, out.memorization_scores, out.memorized

or load this file as a diffusers custom pipeline
(``StableDiffusionPipeline.from_pretrained(path, custom_pipeline="<this file>")``); it only imports
``diffmem`` with absolute imports for that reason.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from dataclasses import dataclass

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput
from diffusers.utils import logging

from diffmem.attention import ATTENTION_CHOICES, attention_processors
from diffmem.hooks.noise import capture_noise_gap
from diffmem.modelio import check_sd_folder
from diffmem.scores.noise_gap import window_mean

#: Values of ``mitigation``: off, NeMo neuron blocking, Wen et al.'s prompt-embedding optimisation.
SUPPORTED_MITIGATIONS = (None, "nemo", "embedding")

logger = logging.get_logger(__name__)

_STOCK_CALL_SIGNATURE = inspect.signature(StableDiffusionPipeline.__call__)


@dataclass
class StableDiffusionMemGuardPipelineOutput(StableDiffusionPipelineOutput):
    """``StableDiffusionPipelineOutput`` plus the memorization score of each image.

    Args:
        memorization_scores (`list[float]`): Wen et al.'s score of each image, in the order of ``images``.
        memorized (`list[bool]` or `None`): ``score >= threshold`` per image; ``None`` when no
            threshold was given (neither ``memorization_threshold=`` nor ``pipe.memorization_threshold``).
        memorization_step_scores (`torch.Tensor` or `None`): ``[n_images, n_unet_calls]`` per-step
            gaps, only when ``return_step_scores=True``.
    """

    memorization_scores: list[float] | None = None
    memorized: list[bool] | None = None
    memorization_step_scores: torch.Tensor | None = None
    #: per image, with a mitigation: first-step score, flagged, action taken ("none", "nemo",
    #: "embedding"), neurons switched off or embedding loss before/after, seconds it added
    mitigations: list[dict] | None = None


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


class StableDiffusionMemGuardPipeline(StableDiffusionPipeline):
    """``StableDiffusionPipeline`` that returns a memorization score (and flag) with every image.

    Loads and saves exactly like ``StableDiffusionPipeline`` (same components, same folder), and
    ``from_pipe(pipe)`` shares the modules of an existing pipeline without copying weights.

    Attributes:
        memorization_threshold (`float` or `None`): default flag threshold when a call passes none
            (set it from ``diffmem.detect.calibrate``).
    """

    memorization_threshold: float | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``StableDiffusionPipeline.from_pretrained``, with a clear error for a local folder that is not
        a complete Stable Diffusion model (no ``model_index.json``, a missing component)."""
        path = str(pretrained_model_name_or_path)
        if os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.count("/") != 1:
            check_sd_folder(path, argument="pretrained_model_name_or_path")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *args,
        memorization_threshold: float | None = None,
        memorization_window: tuple[int, int | None] = (0, None),
        return_step_scores: bool = False,
        mitigation: str | None = None,
        neuron_set=None,
        mitigation_threshold: float | None = None,
        mitigation_options: dict | None = None,
        attention: str | None = None,
        **kwargs,
    ):
        r"""Generate images like ``StableDiffusionPipeline.__call__`` and score each for memorization.

        Every argument of ``StableDiffusionPipeline.__call__`` (``prompt``, ``height``, ``width``,
        ``num_inference_steps``, ``timesteps``, ``sigmas``, ``guidance_scale``, ``negative_prompt``,
        ``num_images_per_prompt``, ``eta``, ``generator``, ``latents``, ``prompt_embeds``,
        ``negative_prompt_embeds``, ``output_type``, ``return_dict``, ``cross_attention_kwargs``,
        ``guidance_rescale``, ``clip_skip``, ``callback_on_step_end``, ...) is accepted and passed on
        unchanged, plus:

        Args:
            memorization_threshold (`float`, *optional*):
                Flag an image as memorized when its score is ``>=`` this (finite, ``>= 0``). Default:
                ``self.memorization_threshold``; with neither, ``memorized`` is ``None``.
            memorization_window (`tuple[int, int | None]`, defaults to ``(0, None)``):
                The steps ``[start, end)`` whose gaps are averaged; ``end=None`` is the last step. Steps
                count UNet calls of the loop (PNDM makes one more call than ``num_inference_steps``).
                ``(0, 1)`` is Wen et al.'s first-step score.
            return_step_scores (`bool`, defaults to ``False``):
                Also return the per-step gaps ``memorization_step_scores`` ``[n_images, n_calls]``.
            mitigation (`str`, *optional*):
                ``None`` (off), ``"nemo"`` or ``"embedding"``. Images whose first-step score is ``>=``
                ``mitigation_threshold`` (default: the memorization threshold) are mitigated, the
                others are generated as without mitigation (see ``diffmem.mitigation``): ``"nemo"``
                switches off the value neurons of ``neuron_set`` (or of a NeMo localization of the
                prompt when ``pipe.nemo_stats`` is set) for those images; ``"embedding"`` optimises
                their prompt embedding (Wen et al.; ``mitigation_options``: ``lr``, ``iterations``,
                ``target_loss``). ``output.mitigations`` says what was done to each image.
            attention (`str`, *optional*):
                ``None`` keeps the model's attention processors (bit-identical to the stock pipeline);
                ``"auto"`` uses xformers on CUDA when installed, PyTorch SDPA otherwise; ``"sdpa"``,
                ``"xformers"``, ``"naive"`` force one. The original processors are restored after the call.

        How the score is taken: with classifier-free guidance (``guidance_scale > 1``) the UNet's
        batch is ``[negative/empty, text]``; the gap is ``text - negative`` (so with a negative prompt
        it is measured against the negative prompt, as the sampler uses it) at no extra UNet call.
        Without guidance the hook runs one extra UNet call per step with the empty-prompt embedding
        (about twice the UNet time). For v-prediction models the gap of the UNet outputs is turned
        into the noise-prediction gap (``sqrt(alpha_bar_t)`` times the v gap).

        Returns:
            ``StableDiffusionMemGuardPipelineOutput`` (``images``, ``nsfw_content_detected``,
            ``memorization_scores``, ``memorized``, ``memorization_step_scores``), or with
            ``return_dict=False`` the tuple ``(images, nsfw_content_detected, memorization_scores, memorized)``.
        """
        bound = _STOCK_CALL_SIGNATURE.bind(self, prompt, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        call.pop("self")
        extra = call.pop("kwargs", {}) or {}

        # 1. check the inputs this wrapper relies on (the stock pipeline checks the rest)
        if mitigation not in SUPPORTED_MITIGATIONS:
            raise ValueError(
                f"mitigation={mitigation!r} is not supported; supported values so far: "
                f"{', '.join(map(repr, SUPPORTED_MITIGATIONS))}"
            )
        if attention not in ATTENTION_CHOICES:
            raise ValueError(
                f"attention={attention!r}: expected one of {', '.join(map(repr, ATTENTION_CHOICES))}"
            )
        check_prompt(call["prompt"], call["prompt_embeds"])
        threshold = check_memorization_threshold(
            self.memorization_threshold if memorization_threshold is None else memorization_threshold
        )
        if call["timesteps"] is not None:
            num_steps = len(call["timesteps"])
        elif call["sigmas"] is not None:
            num_steps = len(call["sigmas"])
        else:
            num_steps = call["num_inference_steps"]
        start, end = check_window(memorization_window, num_steps)
        if memorization_window[1] is None:
            end = None  # all UNet calls, also PNDM's extra one

        # 2. how the gap is read: the CFG halves, or an extra unconditional call with the empty prompt
        guidance = call["guidance_scale"] > 1 and self.unet.config.time_cond_proj_dim is None
        uncond_embeds = None
        if not guidance:
            logger.info(
                "guidance_scale <= 1: the memorization score runs one extra unconditional UNet call per step "
                "(empty-prompt embedding); under classifier-free guidance it costs no extra call"
            )
            uncond_embeds = self._empty_prompt_embeds(
                call["prompt_embeds"], call["cross_attention_kwargs"], call["clip_skip"]
            )
        prediction_type = self.scheduler.config.get("prediction_type", "epsilon")
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)

        # 3. the upstream denoising loop, with attention processors, mitigation and the capture hook in
        #    place; all are removed when the call ends or fails
        with contextlib.ExitStack() as stack:
            stack.enter_context(attention_processors(self.unet, attention))
            stack.enter_context(
                self._mitigation_context(
                    mitigation,
                    call,
                    threshold=threshold if mitigation_threshold is None else mitigation_threshold,
                    guidance=guidance,
                    neuron_set=neuron_set,
                    options=mitigation_options,
                )
            )
            record = stack.enter_context(
                capture_noise_gap(
                    self.unet,
                    guidance=guidance,
                    uncond_embeds=uncond_embeds,
                    prediction_type=prediction_type,
                    alphas_cumprod=alphas_cumprod,
                )
            )
            return_dict = call["return_dict"]
            call["return_dict"] = True
            output = super().__call__(**call, **extra)

        # 4. per-image scores and flags
        step_scores = record.as_tensor()
        n_images = len(output.images)
        if step_scores.numel() == 0:
            step_scores = torch.zeros(n_images, 0)
        scores = window_mean(step_scores, start, end)
        memorization_scores = [float(s) for s in scores]
        memorized = None if threshold is None else [s >= threshold for s in memorization_scores]
        if not return_dict:
            return (output.images, output.nsfw_content_detected, memorization_scores, memorized)
        return StableDiffusionMemGuardPipelineOutput(
            images=output.images,
            nsfw_content_detected=output.nsfw_content_detected,
            memorization_scores=memorization_scores,
            memorized=memorized,
            memorization_step_scores=step_scores if return_step_scores else None,
            mitigations=self.__dict__.pop("_diffmem_mitigation_report", None),
        )

    @contextlib.contextmanager
    def _mitigation_context(self, mitigation: str | None, call: dict, **options):
        """The context that applies ``mitigation`` for one call; ``None``: nothing.

        Extension point for mitigations (NeMo neuron blocking, prompt-embedding optimisation): such a
        context may install hooks on the model or edit ``call`` (the stock pipeline's arguments, e.g.
        ``prompt_embeds``) before the loop, and must undo its hooks on exit. It is entered before the
        score's capture hook, so UNet calls it makes itself are not counted as sampling steps.
        """
        self.__dict__.pop("_diffmem_mitigation_report", None)
        if mitigation is None:
            yield
            return
        from diffmem.mitigation import plan_mitigation

        if options["threshold"] is None:
            raise ValueError(
                f"mitigation={mitigation!r} needs memorization_threshold or mitigation_threshold"
            )
        plan = plan_mitigation(
            self,
            call,
            mitigation,
            check_memorization_threshold(options["threshold"], "mitigation_threshold"),
            guidance=options["guidance"],
            neuron_set=options["neuron_set"],
            embedding_options=options["options"],
        )
        call.update(plan.call)
        self.__dict__["_diffmem_mitigation_report"] = plan.report
        with plan.context:
            yield

    @torch.no_grad()
    def _empty_prompt_embeds(self, prompt_embeds, cross_attention_kwargs, clip_skip) -> torch.Tensor:
        """The empty-prompt text embedding ``[1, seq, dim]`` that the extra unconditional call uses."""
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        embeds, _ = self.encode_prompt(
            [""], self._execution_device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip
        )
        if prompt_embeds is not None:
            embeds = embeds.to(dtype=prompt_embeds.dtype)
        return embeds
