"""Chen et al.'s Bright-Ending-localized embedding mitigation (ICLR 2025, arXiv:2410.21665).

Wen et al.'s prompt-embedding optimisation (:mod:`diffmem.mitigations.embedding`) with its loss restricted
to the memorized region: the Bright Ending mask ``m`` (the end token's cross-attention at the last step
of an unmitigated generation from the same noise, :mod:`diffmem.detectors.bright_ending`) weights the gap,

    L(e) = || m * (eps(x_T, e) - eps(x_T, empty)) || / mean(m)

so the embedding is changed where the image is copied and the rest of the prompt's content is kept.
The authors' code reads the mask from an earlier run; here the plan makes that run itself (one full
generation of the flagged images, the method's cost), then optimises with AdamW (``lr`` 0.05, at most
10 iterations) to ``target_loss`` (default: the flag threshold scaled to the images of the prompt).
"""

from __future__ import annotations

import time

import torch

from diffmem.detectors.bright_ending import bright_ending_capture
from diffmem.mitigations.base import GuardedBatch, MitigationPlan, register_mitigation
from diffmem.mitigations.embedding import EmbeddingMitigation

__all__ = ["BrightEndingEmbeddingMitigation"]


@register_mitigation
class BrightEndingEmbeddingMitigation(EmbeddingMitigation):
    """Wen's embedding optimisation inside the Bright Ending mask of each flagged image."""

    name = "bright-ending-embedding"
    kind = "embedding"

    def masks(self, batch: GuardedBatch, rows: list[int]):
        """The Bright Ending masks ``[len(rows), H, W]`` of an unmitigated run of ``rows``."""

        if any(batch.prompts[batch.prompt_index[k]] is None for k in rows):
            raise ValueError(
                "mitigation 'bright-ending-embedding' needs the prompts (the end token's position)"
            )
        sub = batch.select(rows)
        prompts = [sub.prompts[i] for i in sub.prompt_index]
        with torch.no_grad(), bright_ending_capture(batch.pipe, prompts, 1) as state:
            batch.run_stock(
                rows,
                num_inference_steps=batch.num_inference_steps,
                guidance_scale=batch.guidance_scale,
                output_type="latent",
            )
        return state["mask"]

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        if not any(batch.flagged):
            return MitigationPlan()
        if not batch.guidance:
            raise ValueError(
                "mitigation 'bright-ending-embedding' needs classifier-free guidance (guidance_scale > 1)"
            )
        start = time.perf_counter()
        rows = [k for k, f in enumerate(batch.flagged) if f]
        mask = dict(zip(rows, self.masks(batch, rows)))
        mask_seconds = (time.perf_counter() - start) / len(rows)
        plan = self.optimize(batch, lambda r: torch.stack([mask[k] for k in r]))
        for k in rows:
            plan.report[k]["seconds"] += mask_seconds
            plan.report[k]["action"] = self.name
        return plan
