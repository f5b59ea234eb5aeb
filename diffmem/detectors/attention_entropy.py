"""Ren et al.'s cross-attention entropy detector (ECCV 2024, arXiv:2403.11052), first-step variant.

An ordinary prompt puts most of its cross-attention on the start token (an attention sink); a
memorized prompt pulls attention onto a few trigger tokens, so the attention spread over the 77
positions has higher entropy. With ``A^l`` the conditional branch's post-softmax cross-attention of
layer ``l`` at the first timestep on ``x_T`` (``[heads, pixels, 77]``):

    abar_j = mean_{l in layers, heads h, pixels p} A^l_{h,p,j}        E = - sum_{j=0}^{76} abar_j ln abar_j

(entropy of the averaged distribution, natural log, all 77 positions). Higher ``E`` = memorized. Cost:
one conditional UNet evaluation per generation. Layers: the authors' code uses the fourth ``attn2`` in
forward order (``down_blocks.1.attentions.1``, 32x32 at 512 px on SD-1/2); ``layers="auto"`` takes that
layer on a UNet with SD's 16 cross-attention layers and every layer otherwise (our choice, documented in
``docs/detectors.md``). Entropy in float32 with ``0 ln 0 = 0`` (the code's fp16 log can give NaN).
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.conditioning import prompt_conditioning
from diffmem.detectors.base import Detector, register_detector, timestep_schedule
from diffmem.hooks.attention import cross_attention_layers, cross_attention_probes

__all__ = ["AttentionEntropyDetector", "attention_entropy"]

#: the authors' layer (forward-order index among the 16 attn2 of SD-1/2)
SD_LAYER_INDEX = 3


def attention_entropy(mean_probs: torch.Tensor) -> torch.Tensor:
    """``-sum_j p_j ln p_j`` over the last dimension of averaged attention ``[..., tokens]`` (``0 ln 0 = 0``)."""
    p = mean_probs.float()
    return -torch.special.xlogy(p, p).sum(dim=-1)


@register_detector
class AttentionEntropyDetector(Detector):
    """Entropy of the first step's cross-attention over the prompt's 77 positions (Ren et al., mode E)."""

    name = "ren-entropy"
    reference = "Ren et al., ECCV 2024"

    def __init__(self, layers: str | list[str] = "auto"):
        self.layers = layers

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers}

    def unet_evals(self, num_inference_steps: int) -> float:
        return 1.0

    def resolve_layers(self, unet) -> list[str]:

        names = cross_attention_layers(unet)
        if self.layers != "auto":
            return list(self.layers)
        return [names[SD_LAYER_INDEX]] if len(names) == 16 else names

    @torch.no_grad()
    def score_latents(self, pipe, prompts, latents, settings) -> torch.Tensor:

        embeds, kwargs = prompt_conditioning(pipe, prompts, settings["num_gens"])
        t = timestep_schedule(pipe, settings["num_inference_steps"])[0]
        x = pipe.scheduler.scale_model_input(latents * pipe.scheduler.init_noise_sigma, t)
        sums: list[torch.Tensor] = []

        def record(name, probs):  # [B, H, P, T] -> head- and pixel-mean [B, T]
            sums.append(probs.mean(dim=(1, 2)))

        layers = self.resolve_layers(pipe.unet)
        with cross_attention_probes(pipe.unet, layers, record=record):
            pipe.unet(x, t, encoder_hidden_states=embeds.to(x.dtype), **kwargs)
        return attention_entropy(torch.stack(sums).mean(dim=0))
