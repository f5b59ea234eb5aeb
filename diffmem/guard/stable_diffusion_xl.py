"""A drop-in Stable Diffusion XL pipeline that scores every image for training-data memorization.

``StableDiffusionXLMemGuardPipeline`` is ``StableDiffusionXLPipeline`` (both text encoders,
micro-conditioning; no refiner) with the guard of :mod:`diffmem.guard.pipeline`: Wen et al.'s noise
gap read from the stock loop's UNet calls, flags from the model folder's calibration, mitigations as
objects, edits loaded into the UNet. Without a mitigation the images are bit-identical to the stock
pipeline's for the same inputs and generator. Without guidance the extra unconditional call uses the
conditioning the stock pipeline would give an empty negative prompt (zeros when the model sets
``force_zeros_for_empty_prompt``, as SDXL does), with the call's own time ids.

    from diffmem.pipelines import StableDiffusionXLMemGuardPipeline

    pipe = StableDiffusionXLMemGuardPipeline.from_pretrained("path/to/sdxl")
    out = pipe("a prompt", memorization_window=(0, 1), memorization_threshold=3.0)

Loadable as ``StableDiffusionXLPipeline.from_pretrained(path, custom_pipeline=...)`` with
``pipelines/pipeline_stable_diffusion_xl_memguard.py``.
"""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput

from diffmem.guard.pipeline import MemGuardMixin, guarded_call, guarded_output_class
from diffmem.mitigations.base import GuardedBatch

StableDiffusionXLMemGuardPipelineOutput = guarded_output_class(
    StableDiffusionXLPipelineOutput, "StableDiffusionXLMemGuardPipelineOutput", __name__
)


class StableDiffusionXLMemGuardPipeline(MemGuardMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` that returns a memorization score (and flag) with every image."""

    stock_pipeline_class = StableDiffusionXLPipeline
    output_class = StableDiffusionXLMemGuardPipelineOutput
    __call__ = guarded_call(StableDiffusionXLPipeline)

    @torch.no_grad()
    def _guard_unconditional(self, call: dict):
        _, neg, _, neg_pooled = self.encode_prompt(
            prompt=[""],
            device=self._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            lora_scale=(call["cross_attention_kwargs"] or {}).get("scale"),
            clip_skip=call["clip_skip"],
        )
        if call["prompt_embeds"] is not None:
            neg = neg.to(dtype=call["prompt_embeds"].dtype)
        return neg, {"text_embeds": neg_pooled}

    def _time_ids(self, call: dict, dtype, projection_dim: int, negative: bool) -> torch.Tensor:
        height, width = self.image_size(call["height"], call["width"])
        prefix = "negative_" if negative else ""
        original = call[f"{prefix}original_size"] or (height, width)
        target = call[f"{prefix}target_size"] or (height, width)
        crops = call[f"{prefix}crops_coords_top_left"]
        return self._get_add_time_ids(
            original, crops, target, dtype=dtype, text_encoder_projection_dim=projection_dim
        )

    @torch.no_grad()
    def _guard_batch(self, call: dict, guidance: bool, threshold: float) -> GuardedBatch:
        self._refuse_ip_adapter(call)
        device = self._execution_device
        negative = {
            k: call[k] if guidance else None
            for k in (
                "negative_prompt",
                "negative_prompt_2",
                "negative_prompt_embeds",
                "negative_pooled_prompt_embeds",
            )
        }
        cond, neg, pooled, neg_pooled = self.encode_prompt(
            prompt=call["prompt"],
            prompt_2=call["prompt_2"],
            device=device,
            num_images_per_prompt=call["num_images_per_prompt"] or 1,
            do_classifier_free_guidance=True,
            prompt_embeds=call["prompt_embeds"],
            pooled_prompt_embeds=call["pooled_prompt_embeds"],
            lora_scale=(call["cross_attention_kwargs"] or {}).get("scale"),
            clip_skip=call["clip_skip"],
            **negative,
        )
        n = cond.shape[0]
        if self.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._time_ids(call, cond.dtype, projection_dim, negative=False)
        neg_time_ids = time_ids
        if (
            guidance
            and call["negative_original_size"] is not None
            and call["negative_target_size"] is not None
        ):
            neg_time_ids = self._time_ids(call, cond.dtype, projection_dim, negative=True)
        return self._new_batch(
            call,
            cond,
            neg,
            guidance,
            threshold,
            added_cond={"text_embeds": pooled.to(device), "time_ids": time_ids.to(device).repeat(n, 1)},
            negative_added_cond={
                "text_embeds": neg_pooled.to(device),
                "time_ids": neg_time_ids.to(device).repeat(n, 1),
            },
        )

    def _guard_call_updates(self, batch: GuardedBatch) -> dict:
        neg = batch.negative_added_cond["text_embeds"]
        return dict(
            prompt=None,
            prompt_2=None,
            negative_prompt=None,
            negative_prompt_2=None,
            prompt_embeds=batch.prompt_embeds,
            negative_prompt_embeds=batch.negative_prompt_embeds if batch.guidance else None,
            pooled_prompt_embeds=batch.added_cond["text_embeds"],
            negative_pooled_prompt_embeds=neg if batch.guidance else None,
            num_images_per_prompt=1,
            latents=batch.latents,
        )
