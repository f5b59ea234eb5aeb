"""Wen et al.'s prompt-embedding optimisation as an inference-time mitigation (ICLR 2024).

The conditional text embedding of each flagged prompt is optimised on that prompt's own starting
latents until its first-step noise gap falls to the flag threshold
(:func:`diffmem.embedding_mitigation.optimize_prompt_embeds`); the loop then runs on the new
embedding. Unflagged images keep their embeddings.
"""

from __future__ import annotations

import time
from typing import Any

from diffmem.embedding_mitigation import optimize_prompt_embeds, target_loss_from_threshold
from diffmem.mitigations.base import GuardedBatch, Mitigation, MitigationPlan, register_mitigation
from diffmem.scores.noise_gap import v_to_epsilon_gap_scale

__all__ = ["EmbeddingMitigation"]


@register_mitigation
class EmbeddingMitigation(Mitigation):
    """Optimise the flagged prompts' embeddings (AdamW, ``lr``, at most ``iterations`` updates).

    ``target_loss``: the batch-norm target of Wen et al.'s loss; default: the flag threshold scaled to
    the number of images of the prompt (:func:`~diffmem.embedding_mitigation.target_loss_from_threshold`).
    """

    name = "embedding"
    kind = "embedding"

    def __init__(self, lr: float = 0.05, iterations: int = 10, target_loss: float | None = None):
        if not lr > 0:
            raise ValueError(f"lr: expected a number > 0, got {lr!r}")
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations: expected an integer >= 1, got {iterations!r}")
        self.lr, self.iterations, self.target_loss = float(lr), iterations, target_loss

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "iterations": self.iterations,
            "target_loss": self.target_loss,
        }

    def plan(self, batch: GuardedBatch) -> MitigationPlan:
        return self.optimize(batch)

    def optimize(self, batch: GuardedBatch, loss_mask=None) -> MitigationPlan:
        """Optimise the flagged prompts' embeddings; ``loss_mask(rows) -> [len(rows), H, W]`` localizes the loss."""

        pipe = batch.pipe
        t0 = batch.timesteps[0]
        scale = 1.0
        if pipe.scheduler.config.get("prediction_type", "epsilon") == "v_prediction":
            scale = float(v_to_epsilon_gap_scale(pipe.scheduler.alphas_cumprod[int(t0)]))
        cond = batch.prompt_embeds.clone()
        report: dict[int, dict[str, Any]] = {}
        for _, rows in batch.flagged_prompts().items():
            start = time.perf_counter()
            target = self.target_loss
            if target is None:
                target = target_loss_from_threshold(batch.threshold, len(rows)) / scale
            result = optimize_prompt_embeds(
                pipe.unet,
                pipe.scheduler,
                cond[rows[0] : rows[0] + 1],
                batch.negative_prompt_embeds[rows[0] : rows[0] + 1],
                batch.initial_latents()[rows],
                target_loss=target,
                lr=self.lr,
                iterations=self.iterations,
                timestep=t0,
                unet_kwargs=batch.unet_kwargs(rows),
                negative_unet_kwargs=batch.unet_kwargs(rows, negative=True),
                loss_mask=None if loss_mask is None else loss_mask(rows),
            )
            cond[rows] = result.prompt_embeds.to(cond.dtype).expand(len(rows), -1, -1)
            elapsed = time.perf_counter() - start
            for k in rows:
                report[k] = {
                    "action": self.name,
                    "loss_before": result.losses[0],
                    "loss_after": result.losses[-1],
                    "iterations": result.iterations,
                    "seconds": elapsed / len(rows),
                }
        batch.prompt_embeds = cond
        return MitigationPlan(report=report)
