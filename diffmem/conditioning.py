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
from torch import nn

from diffmem.modelio import is_sdxl

__all__ = [
    "encode_prompts",
    "expand_unet_kwargs",
    "guidance_batch",
    "prompt_conditioning",
    "unconditional_conditioning",
]


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """Text-encoder hidden states ``[n, max_length, dim]`` with max-length padding (all positions kept, as SD does)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(ids)[0]


@torch.no_grad()
def prompt_conditioning(pipe, prompts: Sequence[str], repeat: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(encoder_hidden_states [n * repeat, tokens, dim], unet_kwargs)`` for ``prompts`` (``repeat`` rows each).

    SD: the text encoder's last hidden states with max-length padding (``unet_kwargs`` empty). SDXL:
    the stock ``encode_prompt`` (no guidance) and ``added_cond_kwargs`` with the pooled embeddings and
    the time ids of the pipeline's default resolution, no crop.
    """
    if repeat != 1:
        embeds, kwargs = prompt_conditioning(pipe, prompts)
        added = {
            k: v.repeat_interleave(repeat, dim=0) for k, v in kwargs.get("added_cond_kwargs", {}).items()
        }
        return embeds.repeat_interleave(repeat, dim=0), ({"added_cond_kwargs": added} if added else {})
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


@torch.no_grad()
def unconditional_conditioning(
    pipe, like: torch.Tensor, unet_kwargs: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The unconditional branch the stock pipeline uses with no negative prompt, one row per row of ``like``.

    SD: the empty prompt's hidden states. SDXL: zeros when the pipeline sets
    ``force_zeros_for_empty_prompt`` (SDXL's release does), else the empty prompt; the time ids are
    the conditional call's.
    """
    n = like.shape[0]
    if is_sdxl(pipe) and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        added = unet_kwargs["added_cond_kwargs"]
        zeros = {"text_embeds": torch.zeros_like(added["text_embeds"]), "time_ids": added["time_ids"]}
        return torch.zeros_like(like), {"added_cond_kwargs": zeros}
    embeds, kwargs = prompt_conditioning(pipe, [""])
    if kwargs:
        kwargs = {
            "added_cond_kwargs": {
                **unet_kwargs["added_cond_kwargs"],
                "text_embeds": kwargs["added_cond_kwargs"]["text_embeds"],
            }
        }
    return embeds.expand(n, -1, -1).to(like.dtype), expand_unet_kwargs(kwargs, n)


def guidance_batch(pipe, prompts: Sequence[str], repeat: int = 1) -> tuple[torch.Tensor, dict[str, Any]]:
    """A classifier-free-guidance batch ``[unconditional rows, conditional rows]`` (``2 * n * repeat`` rows)."""
    cond, kwargs = prompt_conditioning(pipe, prompts, repeat)
    uncond, ukwargs = unconditional_conditioning(pipe, cond, kwargs)
    embeds = torch.cat([uncond.to(cond.dtype), cond])
    if not kwargs:
        return embeds, {}
    pos, neg = kwargs["added_cond_kwargs"], ukwargs["added_cond_kwargs"]
    return embeds, {"added_cond_kwargs": {k: torch.cat([neg[k], pos[k]]) for k in pos}}


def to_epsilon(scheduler, output: torch.Tensor, sample: torch.Tensor, t) -> torch.Tensor:
    """A UNet output as a noise prediction (epsilon-, v- or sample-predicting models; ``sample`` is ``x_t``)."""
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return output
    a = scheduler.alphas_cumprod.to(sample.device)[int(t)].to(sample.dtype)
    if kind == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * sample
    if kind == "sample":
        return (sample - a.sqrt() * output) / (1 - a).sqrt()
    raise ValueError(f"unsupported prediction_type {kind!r}")
