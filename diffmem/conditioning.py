"""Prompt conditioning of a pipeline's UNet without guidance: hidden states and any extra UNet inputs.

SD's UNet takes the text encoder's hidden states; SDXL's takes both encoders' penultimate hidden
states concatenated, plus ``added_cond_kwargs`` (the second encoder's pooled, projected output and the
micro-conditioning time ids). Methods that call the UNet themselves (NeMo's criterion, its activation
statistics) get both from :func:`prompt_conditioning`, so they run on either family unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["expand_unet_kwargs", "is_sdxl", "prompt_conditioning"]


def is_sdxl(pipe) -> bool:
    """True for a pipeline whose UNet takes SDXL's ``text_time`` micro-conditioning."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


@torch.no_grad()
def prompt_conditioning(pipe, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(encoder_hidden_states [n, tokens, dim], unet_kwargs)`` for ``prompts`` (one row each).

    SD: the text encoder's last hidden states with max-length padding (``unet_kwargs`` empty). SDXL:
    the stock ``encode_prompt`` (no guidance) and ``added_cond_kwargs`` with the pooled embeddings and
    the time ids of the pipeline's default resolution, no crop.
    """
    from diffmem.localize.stats import encode_prompts

    if not is_sdxl(pipe):
        return encode_prompts(pipe.tokenizer, pipe.text_encoder, prompts), {}
    device = pipe.unet.device
    embeds, _, pooled, _ = pipe.encode_prompt(
        list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = pipe.image_size() if hasattr(pipe, "image_size") else (side, side)
    if pipe.text_encoder_2 is not None:
        projection_dim = pipe.text_encoder_2.config.projection_dim
    else:
        projection_dim = int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=embeds.dtype,
        text_encoder_projection_dim=projection_dim,
    )
    added = {"text_embeds": pooled, "time_ids": time_ids.to(device).repeat(len(prompts), 1)}
    return embeds, {"added_cond_kwargs": added}


def expand_unet_kwargs(unet_kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """``unet_kwargs`` of one row repeated to ``batch`` rows (tensors in ``added_cond_kwargs``)."""
    added = unet_kwargs.get("added_cond_kwargs")
    if not added:
        return dict(unet_kwargs)
    rows = {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 else v for k, v in added.items()}
    return {**unet_kwargs, "added_cond_kwargs": rows}
