"""The pad-token fix (Kim & No, arXiv 2605.02908, CVPR 2026 Findings): SD-1's padding repeats ``<eot>``.

SD-1's CLIP tokenizer pads every prompt to 77 tokens with ``<|endoftext|>`` itself, so the text encoder's
outputs at the padding positions duplicate the end token's, the one embedding CLIP's training optimises,
and the copies amplify it: the paper finds they drive memorization while the prompt tokens matter little.
Its two inference-time fixes, for each flagged image's conditional branch (the unconditional branch is the
stock one):

* ``strategy="repad"`` (default): re-encode the prompt with every position after the first end token set
  to ``pad_token`` (``"!"``, SD-2's padding) and mask ``<eot>`` (``-inf`` cross-attention logit);
* ``strategy="partial"``: keep the stock padding and mask the first ``pad_fraction`` of the pad positions.

"Masking" is read as removing the position from cross-attention (diffmem's reading; the abstract does not
say whether the embedding is zeroed instead). Free: no UNet call; while a flagged image is in the batch
every ``attn2`` runs the explicit attention of :class:`~diffmem.hooks.attention.CrossAttentionProbe`
(unflagged images then equal the unmitigated ones to float rounding). SD-1/2 only (one CLIP tokenizer;
SDXL's second tokenizer already pads with ``"!"``). CLIP's text encoder is causal, so re-padding leaves
the embeddings up to ``<eot>`` unchanged and changes only the padding positions.
"""

from __future__ import annotations

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
    """``repad``: pads -> ``pad_token`` and ``<eot>`` masked; ``partial``: the first ``pad_fraction`` of the pads masked."""

    name = "pad-token"
    kind = "embedding"

    def __init__(self, strategy: str = "repad", pad_token: str = "!", pad_fraction: float = 0.5):
        if strategy not in ("repad", "partial"):
            raise ValueError(f"strategy: expected 'repad' or 'partial', got {strategy!r}")
        pad_fraction = float(pad_fraction)
        if not 0 <= pad_fraction <= 1:
            raise ValueError(f"pad_fraction: expected a number in [0, 1], got {pad_fraction!r}")
        self.strategy, self.pad_token, self.pad_fraction = strategy, str(pad_token), pad_fraction

    def config(self) -> dict[str, Any]:
        out = {"name": self.name, "strategy": self.strategy}
        out.update(
            {"pad_token": self.pad_token} if self.strategy == "repad" else {"pad_fraction": self.pad_fraction}
        )
        return out

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        if not any(batch.flagged):
            return MitigationPlan()
        pipe = batch.pipe
        if is_sdxl(pipe):
            raise ValueError(
                "mitigation 'pad-token' supports SD-1/2 pipelines (one CLIP tokenizer), not SDXL"
            )
        if any(p is None for p in batch.prompts):
            raise ValueError(
                "mitigation 'pad-token' needs the prompts (it finds their padding), not prompt_embeds"
            )
        rows = [k for k, f in enumerate(batch.flagged) if f]
        report = {k: {"action": self.name} for k in rows}
        if self.strategy == "repad":
            ids = repadded_ids(pipe, batch.prompts, self.pad_token).to(pipe.text_encoder.device)
            with torch.no_grad():
                embeds = pipe.text_encoder(ids)[0]
            cond = batch.prompt_embeds.clone()
            cond[rows] = embeds[torch.tensor([batch.prompt_index[k] for k in rows])].to(cond)
            batch.prompt_embeds = cond
        elif self.pad_fraction == 0:
            return MitigationPlan(report=report)
        return MitigationPlan(
            context=cross_attention_probes(pipe.unet, logits=self.logits_for(batch)), report=report
        )

    def masked_positions(self, batch: GuardedBatch) -> torch.Tensor:
        """``[n_images, tokens]``: the positions the flagged images' conditional rows do not attend to."""
        ends = end_token_positions(batch.pipe, batch.prompts)[torch.tensor(batch.prompt_index)]
        limit = batch.pipe.tokenizer.model_max_length
        tokens = torch.arange(limit)
        masked = torch.zeros(batch.num_images, limit, dtype=torch.bool)
        for k, flag in enumerate(batch.flagged):
            if not flag:
                continue
            end = int(ends[k])
            if self.strategy == "repad":
                masked[k, end] = True
            else:
                count = round(self.pad_fraction * (limit - 1 - end))
                masked[k] = (tokens > end) & (tokens <= end + count)
        return masked

    def logits_for(self, batch: GuardedBatch):
        """The ``logits(name, scores)`` rewrite: ``-inf`` at :meth:`masked_positions` of the conditional rows."""
        n = batch.num_images
        masked = self.masked_positions(batch)

        def logits(name, scores):  # [2n, H, P, T] (rows: negative, conditional) or [n, ...] without guidance
            if scores.shape[0] not in (n, 2 * n) or scores.shape[-1] != masked.shape[1]:
                return scores
            rows = torch.cat([torch.zeros_like(masked), masked]) if scores.shape[0] == 2 * n else masked
            return scores.masked_fill(rows.to(scores.device)[:, None, None, :], float("-inf"))

        return logits
