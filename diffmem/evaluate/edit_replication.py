"""Replication with and without an edit, per caption, on a model whose training images are known.

The measurements behind NeMo's evaluation on the organism (``benchmarks/nemo_eval.py``), usable with any
edit and any :class:`~diffmem.organism.replication.TrainingImages`:

* :meth:`EditReplication.per_caption`: each memorized caption generated ``num_gens`` times before and
  with its own edit applied: how many generations replicate its own training image (SSIM >= 0.7,
  ``PRESETS["organism"]``'s per-image rule) and Wen et al.'s first-step and all-step scores;
* :meth:`EditReplication.edit_vs_control`: one edit (e.g. the union of all sets) against a control of
  the same size (:func:`~diffmem.evaluate.localization.random_control`): held-out images' SSIM to the
  unedited ones, and verbatim replication;
* :meth:`EditReplication.pipeline_modes`: the guarded pipeline's mitigations, replication and seconds
  per prompt on memorized and on held-out captions, and what the guard did to each image.

Generation ``j`` of a caption starts from ``item_generator(seed, caption, j)``
(:func:`diffmem.organism.evaluate.generate_and_measure`), so every setting sees the same noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from diffmem.edits import applied
from diffmem.organism.evaluate import generate_and_measure
from diffmem.scores.similarity import ssim

__all__ = ["EditReplication"]


class EditReplication:
    """Measurements of ``pipe`` (a guarded pipeline) against ``training``; see the module doc."""

    def __init__(
        self,
        pipe,
        training,
        *,
        num_gens: int = 10,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        log=print,
    ):
        self.pipe, self.training = pipe, training
        self.num_gens, self.steps, self.guidance, self.seed = (
            num_gens,
            num_inference_steps,
            guidance_scale,
            seed,
        )
        self.log = log

    def measure(self, captions: Sequence[str], role: str, **pipe_kwargs):
        """``(generations, images)`` of ``captions`` (each ``num_gens`` times) as they are now."""

        return generate_and_measure(
            self.pipe,
            [(c, role) for c in captions],
            self.training,
            num_gens=self.num_gens,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            seed=self.seed,
            batch_size=1,
            progress=False,
            **pipe_kwargs,
        )

    @staticmethod
    def replicated(gens) -> int:
        """Generations that replicate their caption's own training image."""
        return sum(g.replicates_own for g in gens)

    @staticmethod
    def mean_score(gens, window: str) -> float:
        return statistics.mean(g.scores[window] for g in gens)

    def per_caption(self, edits: Sequence[tuple[str, str, Any]]) -> list[dict]:
        """Rows for ``(caption, role, edit)``: replication and Wen's scores before and with the edit."""

        rows = []
        for caption, role, edit in edits:
            before, _ = self.measure([caption], role)
            with applied(self.pipe.unet, edit):
                after, _ = self.measure([caption], role)
            row = {
                "caption": caption,
                "role": role,
                "replicated_before": self.replicated(before),
                "replicated_after": self.replicated(after),
                "wen_first_before": self.mean_score(before, "first_step"),
                "wen_first_after": self.mean_score(after, "first_step"),
                "wen_all_before": self.mean_score(before, "all_steps"),
                "wen_all_after": self.mean_score(after, "all_steps"),
            }
            rows.append(row)
            self.log(
                f"{role:8s} replicated {row['replicated_before']}/{self.num_gens} -> "
                f"{row['replicated_after']}/{self.num_gens}  {caption!r}"
            )
        return rows

    def edit_vs_control(
        self, edits: Mapping[str, Any], heldout: Sequence[str], memorized: Sequence[str]
    ) -> dict[str, dict]:
        """Per named edit: held-out SSIM to the unedited images (median, min) and replication per
        memorized caption with the edit applied."""

        _, plain = self.measure(heldout, "heldout")
        out = {}
        for name, edit in edits.items():
            with applied(self.pipe.unet, edit):
                _, images = self.measure(heldout, "heldout")
                reps = [self.replicated(self.measure([c], "verbatim")[0]) for c in memorized]
            sims = ssim(
                torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(plain).permute(0, 3, 1, 2)
            ).tolist()
            out[name] = {
                "neurons": len(edit) if hasattr(edit, "__len__") else None,
                "heldout_ssim_median": statistics.median(sims),
                "heldout_ssim_min": min(sims),
                "verbatim_replicated": reps,
            }
            self.log(f"{name}: {out[name]}")
        return out

    def pipeline_modes(
        self, modes: Mapping[str, dict], memorized: Sequence[str], heldout: Sequence[str]
    ) -> dict[str, dict]:
        """Per mode (pipeline keyword arguments): replication, Wen's all-step score and seconds per
        memorized prompt, seconds per held-out prompt, and the count of each action the guard took."""
        out = {}
        for mode, kwargs in modes.items():
            reps, scores, t_mem, t_held, actions = [], [], [], [], []
            for caption in memorized:
                gens, _ = self.measure([caption], "verbatim", **kwargs)
                reps.append(self.replicated(gens))
                scores.append(self.mean_score(gens, "all_steps"))
                t_mem.append(sum(g.seconds for g in gens))
                actions += [g.mitigation["action"] for g in gens if g.mitigation]
            for caption in heldout:
                gens, _ = self.measure([caption], "heldout", **kwargs)
                t_held.append(sum(g.seconds for g in gens))
                actions += [g.mitigation["action"] for g in gens if g.mitigation]
            out[mode] = {
                "verbatim_replicated": reps,
                "verbatim_wen_all": scores,
                "seconds_verbatim_prompt": statistics.mean(t_mem) if t_mem else None,
                "seconds_heldout_prompt": statistics.mean(t_held) if t_held else None,
                "actions": {a: actions.count(a) for a in sorted(set(actions))},
            }
            self.log(f"pipeline {mode}: {out[mode]}")
        return out
