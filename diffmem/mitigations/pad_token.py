"""The pad-token fix (arXiv 2605.02908, 2026): SD-1's padding repeats ``<eot>``, and the copies drive memorization.

SD-1's CLIP tokenizer pads every prompt to 77 tokens with ``<|endoftext|>`` itself, so the text encoder's
outputs at the padding positions are near copies of the end token's, and cross-attention reads the same
summary many times over. For each flagged image the conditional prompt embedding is re-encoded with every
position after the first end token replaced by ``pad_token`` (default ``"!"``, SD-2's padding), and with
``mask_pads`` those positions get ``-inf`` cross-attention logits on the conditional branch (the
unconditional branch is the stock one). ``eot_scale < 1`` partly masks ``<eot>`` itself: its attention
weight is multiplied by ``eot_scale`` before the softmax normalises (``+ ln eot_scale`` on its logit).

CLIP's text encoder is causal, so the tokens up to the end token do not see the padding: with
``mask_pads`` the padding token changes nothing and the fix is the mask alone. Free: no UNet call; while
a flagged image is in the batch every ``attn2`` runs the explicit attention of
:class:`~diffmem.hooks.attention.CrossAttentionProbe` (unflagged images then equal the unmitigated ones to
float rounding). SD-1/2 only (one CLIP tokenizer; SDXL's second tokenizer already pads with ``"!"``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffmem.detectors.bright_ending import end_token_positions
from diffmem.hooks.attention import cross_attention_probes
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation
from diffmem.modelio import is_sdxl

__all__ = ["PadTokenMitigation", "repadded_ids"]


def repadded_ids(pipe, prompts: list[str], pad_token: str) -> torch.Tensor:
    """Token ids ``[n, model_max_length]`` of ``prompts`` (``pipe``'s tokenizer) with every position after the
    first end token set to ``pad_token`` (one token of the vocabulary)."""
    tokenizer = pipe.tokenizer
    pad = tokenizer(pad_token, add_special_tokens=False).input_ids
    if len(pad) != 1:
        raise ValueError(
            f"pad_token: expected one token of the tokenizer's vocabulary, {pad_token!r} is {len(pad)}"
        )
    limit = tokenizer.model_max_length
    ids = tokenizer(
        list(prompts), padding="max_length", max_length=limit, truncation=True, return_tensors="pt"
    )
    ids = ids.input_ids.clone()
    for i, end in enumerate(end_token_positions(pipe, list(prompts)).tolist()):
        ids[i, end + 1 :] = pad[0]
    return ids


@register_mitigation
class PadTokenMitigation(Mitigation):
    """Re-pad the flagged prompts with ``pad_token``, mask the pads, optionally dim ``<eot>``."""

    name = "pad-token"
    kind = "embedding"

    def __init__(self, pad_token: str = "!", mask_pads: bool = True, eot_scale: float = 1.0):
        eot_scale = float(eot_scale)
        if not 0 < eot_scale <= 1:
            raise ValueError(f"eot_scale: expected a number in (0, 1], got {eot_scale!r}")
        self.pad_token, self.mask_pads, self.eot_scale = str(pad_token), bool(mask_pads), eot_scale

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pad_token": self.pad_token,
            "mask_pads": self.mask_pads,
            "eot_scale": self.eot_scale,
        }

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        if not any(batch.flagged):
            return MitigationPlan()
        pipe = batch.pipe
        if is_sdxl(pipe):
            raise ValueError(
                "mitigation 'pad-token' supports SD-1/2 pipelines (one CLIP tokenizer), not SDXL"
            )
        if any(p is None for p in batch.prompts):
            raise ValueError("mitigation 'pad-token' needs the prompts (it re-pads them), not prompt_embeds")
        ids = repadded_ids(pipe, batch.prompts, self.pad_token).to(pipe.text_encoder.device)
        with torch.no_grad():
            embeds = pipe.text_encoder(ids)[0]
        rows = [k for k, f in enumerate(batch.flagged) if f]
        cond = batch.prompt_embeds.clone()
        index = torch.tensor([batch.prompt_index[k] for k in rows])
        cond[rows] = embeds[index].to(cond)
        batch.prompt_embeds = cond
        report = {k: {"action": self.name} for k in rows}
        if not self.mask_pads and self.eot_scale == 1.0:
            return MitigationPlan(report=report)
        return MitigationPlan(
            context=cross_attention_probes(pipe.unet, logits=self.logits_for(batch)), report=report
        )

    def logits_for(self, batch: GuardedBatch):
        """The ``logits(name, scores)`` rewrite: the flagged images' conditional rows only."""
        n = batch.num_images
        flagged = torch.tensor(batch.flagged)
        ends = end_token_positions(batch.pipe, batch.prompts)[torch.tensor(batch.prompt_index)]
        log_eot = math.log(self.eot_scale)

        def logits(name, scores):  # [2n, H, P, T] (rows: negative, conditional) or [n, ...] without guidance
            if scores.shape[0] not in (n, 2 * n):
                return scores
            offset = scores.shape[0] - n
            scores = scores.clone()
            tokens = torch.arange(scores.shape[-1], device=scores.device)
            for k in torch.nonzero(flagged).flatten().tolist():
                end = int(ends[k])
                if log_eot:
                    scores[offset + k, :, :, end] = scores[offset + k, :, :, end] + log_eot
                if self.mask_pads:
                    scores[offset + k] = scores[offset + k].masked_fill(tokens > end, float("-inf"))
            return scores

        return logits
