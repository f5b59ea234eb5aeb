"""A drop-in Stable Diffusion pipeline that scores every image for training-data memorization.

``StableDiffusionMemGuardPipeline`` is ``StableDiffusionPipeline`` with one wrapper around its
``__call__`` (:mod:`diffmem.guard.pipeline`): a forward hook on the UNet reads the noise predictions of
the sampling loop and turns them into Wen et al.'s memorization score (ICLR 2024, "Detecting,
Explaining, and Mitigating Memorization in Diffusion Models"):

    score(image) = mean_{start <= k < end} || eps(x_k, t_k, c) - eps(x_k, t_k, empty) ||_2

where ``k`` counts the UNet calls of the loop. Under classifier-free guidance both predictions are
already in the loop's batch, so the score costs no extra UNet call; with guidance off, the hook runs
one extra unconditional call per step. The denoising loop itself is the upstream one, untouched: with
no mitigation the images are bit-identical to ``StableDiffusionPipeline``'s for the same inputs and
generator, and ``return_dict=False`` returns exactly the stock tuple.

Use it like the stock pipeline::

    from diffmem.pipelines import StableDiffusionMemGuardPipeline

    pipe = StableDiffusionMemGuardPipeline.from_pretrained("path/to/sd")   # or .from_pipe(stock_pipe)
    out = pipe("a prompt")            # flags with the folder's calibration, if it has one
    out.images, out.memorization_scores, out.memorized

or load ``pipelines/pipeline_stable_diffusion_memguard.py`` as a diffusers custom pipeline
(``StableDiffusionPipeline.from_pretrained(path, custom_pipeline=<that file>)``).
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

from diffmem.guard.pipeline import MemGuardMixin, guarded_call, guarded_output_class
from diffmem.mitigations.base import GuardedBatch

StableDiffusionMemGuardPipelineOutput = guarded_output_class(
    StableDiffusionPipelineOutput, "StableDiffusionMemGuardPipelineOutput", __name__
)


class StableDiffusionMemGuardPipeline(MemGuardMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` that returns a memorization score (and flag) with every image.

    Loads and saves like ``StableDiffusionPipeline`` (a saved folder loads in stock diffusers; the
    calibration ``diffmem_calibration.json`` is kept beside it), and ``from_pipe(pipe)`` shares the
    modules of an existing pipeline without copying weights. See :class:`diffmem.guard.pipeline.MemGuardMixin`.
    """

    stock_pipeline_class = StableDiffusionPipeline
    output_class = StableDiffusionMemGuardPipelineOutput
    __call__ = guarded_call(StableDiffusionPipeline)

    @torch.no_grad()
    def _guard_unconditional(self, call: dict):
        lora_scale = (call["cross_attention_kwargs"] or {}).get("scale")
        embeds, _ = self.encode_prompt(
            [""], self._execution_device, 1, False, lora_scale=lora_scale, clip_skip=call["clip_skip"]
        )
        if call["prompt_embeds"] is not None:
            embeds = embeds.to(dtype=call["prompt_embeds"].dtype)
        return embeds, None

    @torch.no_grad()
    def _guard_batch(self, call: dict, guidance: bool, threshold: float) -> GuardedBatch:
        self._refuse_ip_adapter(call)
        cond, neg = self.encode_prompt(
            call["prompt"],
            self._execution_device,
            call["num_images_per_prompt"] or 1,
            True,
            call["negative_prompt"] if guidance else None,
            prompt_embeds=call["prompt_embeds"],
            negative_prompt_embeds=call["negative_prompt_embeds"] if guidance else None,
            lora_scale=(call["cross_attention_kwargs"] or {}).get("scale"),
            clip_skip=call["clip_skip"],
        )
        return self._new_batch(call, cond, neg, guidance, threshold)

    def _guard_call_updates(self, batch: GuardedBatch) -> dict:
        return dict(
            prompt=None,
            negative_prompt=None,
            prompt_embeds=batch.prompt_embeds,
            negative_prompt_embeds=batch.negative_prompt_embeds if batch.guidance else None,
            num_images_per_prompt=1,
            latents=batch.latents,
        )
