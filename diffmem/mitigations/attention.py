"""Ren et al.'s cross-attention re-scaling (ECCV 2024, arXiv:2403.11052) as an inference-time mitigation.

A memorized prompt pulls cross-attention away from the start token onto trigger tokens. For each
flagged image, in every ``attn2`` layer and at every step (the authors' code):

* the conditional branch's start-token logit is multiplied by ``bos_scale`` ``C`` (default 1.25):
  ``s_{p,0} <- C s_{p,0}`` before the softmax (it raises the start token's share where its logit is
  positive, as it is for SD's attention sink);
* with ``mask_padding``, the logits of the padding positions after the first end token are set to
  ``-inf`` on both branches (the code's default keeps the end token).

It needs the attention probabilities, so while a flagged image is in the batch every ``attn2`` runs
the explicit attention of :class:`~diffmem.hooks.attention.CrossAttentionProbe`: the batch's unflagged
images then equal the unmitigated ones to float rounding (bit for bit when nothing is flagged). Costs
about the explicit attention's extra time, no UNet call.
"""

from __future__ import annotations

from typing import Any

import torch

from diffmem.detectors.bright_ending import end_token_positions
from diffmem.hooks.attention import cross_attention_probes
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation

__all__ = ["AttentionRescaleMitigation"]


@register_mitigation
class AttentionRescaleMitigation(Mitigation):
    """Start-token logit times ``bos_scale`` (conditional branch) and padding masked, for flagged images."""

    name = "attention-rescale"
    kind = "attention"

    def __init__(self, bos_scale: float = 1.25, mask_padding: bool = True):
        self.bos_scale, self.mask_padding = float(bos_scale), bool(mask_padding)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "bos_scale": self.bos_scale, "mask_padding": self.mask_padding}

    def plan(self, batch: GuardedBatch) -> MitigationPlan:

        if not any(batch.flagged):
            return MitigationPlan()
        if not batch.guidance:
            raise ValueError(
                "mitigation 'attention-rescale' needs classifier-free guidance (guidance_scale > 1)"
            )
        if any(p is None for p in batch.prompts):
            raise ValueError(
                "mitigation 'attention-rescale' needs the prompts (it masks their padding), not prompt_embeds"
            )
        report = {k: {"action": self.name} for k, f in enumerate(batch.flagged) if f}
        return MitigationPlan(
            context=cross_attention_probes(batch.pipe.unet, logits=self.logits_for(batch)), report=report
        )

    def logits_for(self, batch: GuardedBatch):
        """The ``logits(name, scores)`` rewrite of ``batch``'s guidance batch (rows: negative, conditional)."""

        n = batch.num_images
        flagged = torch.tensor(batch.flagged)
        lengths = (end_token_positions(batch.pipe, batch.prompts) + 1)[torch.tensor(batch.prompt_index)]

        def logits(name, scores):  # [2n, H, P, T]: rows [negative (n), conditional (n)]
            if scores.shape[0] != 2 * n:
                return scores
            scores = scores.clone()
            cond = torch.arange(n, 2 * n, device=scores.device)[flagged.to(scores.device)]
            scores[cond, :, :, 0] = scores[cond, :, :, 0] * self.bos_scale
            if self.mask_padding:
                tokens = torch.arange(scores.shape[-1], device=scores.device)
                pad = tokens[None, :] >= lengths.to(scores.device)[:, None]  # [n, T]
                pad = pad & flagged.to(scores.device)[:, None]
                pad = torch.cat([pad, pad])[:, None, None, :]
                scores = scores.masked_fill(pad, float("-inf"))
            return scores

        return logits
