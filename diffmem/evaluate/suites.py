"""Labelled prompt sets the harness ranks detectors on: the organism's splits, or prompt files.

The organism's ground truth has four splits:

* ``memorized-vs-clean``: verbatim and template captions (1) against held-out and generic ones (0);
* ``verbatim-vs-heldout``: the saturated split (first-step Wen is at AUC 1.0 there);
* ``perturbed``: memorized captions with words dropped, reordered, replaced, truncated, or all but one
  or two words removed or replaced by generic ones (seeded), labelled by **measured** replication of a
  memorized training image;
* ``triggers``: prompts never trained on (unseen colour/shape phrasings and random mixes of the
  memorized captions' words), labelled by measured replication, so that a prompt that makes the
  model copy without being a training caption (the held-out "a pink circle" and the Summer Palace
  photograph) counts as memorized; on a recipe with trigger prompts (v3) its partial and reordered
  captions join them.

On a recipe with graded duplication (v3) every copy count ``N`` also gets a split ``copies-N-vs-heldout``
(the verbatim captions duplicated ``N`` times against the held-out ones) and ``copies-N-vs-1`` (against
the captions seen once: same style and length, the matched control, since the held-out captions are
short and the noise gap grows with the caption), so a detector can be ranked by how little duplication
it still detects.

Measured labels come from generations of the model itself (``label_generations`` per prompt, 25
steps, guidance 7.5) judged by one :class:`~diffmem.scores.replication.ReplicationCriterion`; the labelled
suite is cached as ``suite.json`` so a rerun (or another method) reuses it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from diffmem.io import atomic_write_json
from diffmem.organism.data import COLOURS, SHAPES, build_organism_data
from diffmem.organism.evaluate import generate_and_measure
from diffmem.organism.recipe import recipe_of
from diffmem.organism.replication import organism_training_images
from diffmem.scores.replication import criterion as preset

__all__ = ["LabelledPrompt", "Suite", "organism_suite", "perturb_caption", "suite_from_rows"]

#: The organism's roles whose training images are duplicated, i.e. what a copy is a copy of.
MEMORIZED_ROLES = ("verbatim", "template")
#: Splits whose labels are measured by generating (the others follow from the captions' roles).
MEASURED_SPLITS = ("perturbed", "triggers")


@dataclass(frozen=True)
class LabelledPrompt:
    id: str
    prompt: str
    label: int
    role: str = ""
    similarity: float | None = None
    #: the training images the prompt is known to reproduce, where the prompt set names them (MemBench's URLs)
    sources: tuple[str, ...] = ()


@dataclass
class Suite:
    """Named splits of labelled prompts, and how the labels were made."""

    name: str
    splits: dict[str, list[LabelledPrompt]]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "info": self.info,
            "splits": {k: [asdict(p) for p in v] for k, v in self.splits.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> Suite:
        splits = {
            k: [LabelledPrompt(**{**p, "sources": tuple(p.get("sources", ()))}) for p in v]
            for k, v in data["splits"].items()
        }
        return cls(data["name"], splits, dict(data.get("info", {})))

    def summary(self) -> dict[str, tuple[int, int]]:
        """Split -> (positives, negatives)."""
        return {k: (sum(p.label for p in v), sum(1 - p.label for p in v)) for k, v in self.splits.items()}


def suite_from_rows(name: str, rows: Sequence[dict], split: str = "all") -> Suite:
    """A one-split suite from rows ``{"id", "prompt", "label"[, "role", "sources"]}`` (what the prompt
    readers give)."""
    prompts = [
        LabelledPrompt(
            str(r["id"]),
            r["prompt"],
            int(r["label"]),
            str(r.get("role", "")),
            sources=tuple(r.get("sources", ())),
        )
        for r in rows
    ]
    return Suite(name, {split: prompts})


#: Perturbations, from mild (one word) to strong (one word kept among generic ones).
PERTURBATIONS = ("drop", "swap", "replace", "truncate", "keep-two", "generic")


def perturb_caption(
    caption: str,
    rng: random.Random,
    vocabulary: Sequence[str],
    kind: str | None = None,
    generic: Sequence[str] = (),
) -> tuple[str, str]:
    """One seeded perturbation of ``caption`` (``kind`` from :data:`PERTURBATIONS`, default random): drop a
    word, swap two, replace one from ``vocabulary``, keep the first half, keep two words, or keep one word
    among words drawn from ``generic``."""
    words = caption.split()
    if kind is None:
        kind = rng.choice(PERTURBATIONS if len(words) > 2 else ("replace",))
    if len(words) <= 2 and kind != "generic":
        kind = "replace"
    if kind == "drop":
        del words[rng.randrange(len(words))]
    elif kind == "swap":
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    elif kind == "replace":
        words[rng.randrange(len(words))] = rng.choice(list(vocabulary))
    elif kind == "truncate":
        words = words[: max(2, len(words) // 2)]
    elif kind == "keep-two":
        keep = sorted(rng.sample(range(len(words)), 2))
        words = [words[i] for i in keep]
    elif kind == "generic":
        pool = list(generic) or list(vocabulary)
        words = [rng.choice(pool) for _ in range(3)] + [rng.choice(words)]
        rng.shuffle(words)
    else:
        raise ValueError(f"kind: expected one of {', '.join(PERTURBATIONS)}, got {kind!r}")
    return " ".join(words), kind


def _candidate_prompts(data, seed: int, num_perturbations: int, num_triggers: int):

    rng = random.Random(seed)
    memorized = data.captions("verbatim") + data.captions("template")
    vocabulary = sorted({w for c in memorized for w in c.split()})
    trained = set(memorized) | set(data.captions("generic"))
    perturbed, seen = [], set(trained)
    generic = sorted({w for c in data.captions("generic") for w in c.split()})
    for i, caption in enumerate(memorized):
        for k in range(num_perturbations):
            kind = PERTURBATIONS[(i + k) % len(PERTURBATIONS)]  # every strength on every caption set
            text, kind = perturb_caption(caption, rng, vocabulary, kind, generic)
            if text not in seen:
                seen.add(text)
                perturbed.append((f"perturbed-{i}-{k}", text, kind))
    triggers = []
    phrasings = ["a {c} {s}", "{c} {s}", "a photo of a {c} {s}", "a {s}, {c}"]
    while len(triggers) < num_triggers:
        if rng.random() < 2 / 3:
            text = rng.choice(phrasings).format(c=rng.choice(list(COLOURS)), s=rng.choice(SHAPES))
            kind = "shape phrasing"
        else:
            text = " ".join(rng.sample(vocabulary, rng.randint(3, 6)))
            kind = "word mix"
        if text not in seen:
            seen.add(text)
            triggers.append((f"trigger-{len(triggers)}", text, kind))
    return perturbed, triggers


def measure_replication(
    pipe,
    prompts: Sequence[str],
    *,
    generations: int,
    seed: int,
    steps: int,
    guidance_scale: float,
    progress: bool,
    recipe=None,
):
    """Per prompt: the SSIM of each generation to its nearest *memorized* training image (verbatim/template)
    of the organism ``recipe`` (default v2's)."""
    import torch

    memorized = organism_training_images(recipe=recipe).of_roles(MEMORIZED_ROLES)
    gens, _ = generate_and_measure(
        pipe,
        [(p, "heldout") for p in prompts],
        memorized,
        num_gens=generations,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        seed=seed,
        progress=progress,
    )
    sims = torch.tensor([g.nearest_ssim for g in gens]).view(len(prompts), generations)
    return sims


def organism_suite(
    pipe,
    cache: str | Path | None = None,
    *,
    seed: int = 0,
    num_perturbations: int = 4,
    num_triggers: int = 48,
    label_generations: int = 2,
    criterion: str = "organism-half",
    measured: bool = True,
    progress: bool = True,
    recipe=None,
) -> Suite:
    """The organism's splits (module docstring); measured labels cached in ``cache`` (a folder).

    ``measured=False``: only the splits of known roles (no generation needed). ``recipe``: the
    organism's data (default: the recipe ``pipe``'s folder records, v2's when it records none).
    """

    rule = preset(criterion)
    recipe = recipe or recipe_of(pipe)
    settings = {
        "version": 3,
        "organism": recipe.name,
        "seed": seed,
        "num_perturbations": num_perturbations,
        "num_triggers": num_triggers,
        "label_generations": label_generations,
        "criterion": criterion,
        "steps": recipe.num_inference_steps,
        "guidance_scale": recipe.guidance_scale,
        "measured": measured,
    }
    path = Path(cache) / "suite.json" if cache is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("info", {}).get("settings") == settings:
            return Suite.from_dict(data)
    data = build_organism_data(recipe)

    def rows(role: str, label: int) -> list[LabelledPrompt]:
        return [LabelledPrompt(f"{role}-{i}", c, label, role) for i, c in enumerate(data.captions(role))]

    clean = rows("heldout", 0) + rows("generic", 0)
    splits = {
        "memorized-vs-clean": rows("verbatim", 1) + rows("template", 1) + clean,
        "verbatim-vs-heldout": rows("verbatim", 1) + rows("heldout", 0),
    }
    counts = sorted({im.copies for im in data.by_role("verbatim")}) if recipe.duplication_counts else []

    def of_count(count: int, label: int) -> list[LabelledPrompt]:
        captions = [im.caption for im in data.by_role("verbatim") if im.copies == count]
        return [LabelledPrompt(f"copies{count}-{i}", c, label, "verbatim") for i, c in enumerate(captions)]

    for count in counts:
        splits[f"copies-{count}-vs-heldout"] = of_count(count, 1) + rows("heldout", 0)
    for count in counts[1:]:
        splits[f"copies-{count}-vs-{counts[0]}"] = of_count(count, 1) + of_count(counts[0], 0)
    perturbed, triggers = _candidate_prompts(data, seed, num_perturbations, num_triggers)
    taken = {text for _, text, _ in perturbed + triggers}
    triggers += [
        (f"trigger-{t.kind}-{i}", t.prompt, t.kind)
        for i, t in enumerate(data.triggers)
        if t.prompt not in taken
    ]
    for split, candidates in (("perturbed", perturbed), ("triggers", triggers)) if measured else ():
        sims = measure_replication(
            pipe,
            [text for _, text, _ in candidates],
            generations=label_generations,
            seed=seed + 1,
            steps=recipe.num_inference_steps,
            guidance_scale=recipe.guidance_scale,
            progress=progress,
            recipe=recipe,
        )
        labels = rule.memorized(sims).tolist()
        splits[split] = [
            LabelledPrompt(pid, text, int(lab), kind, float(s.max()))
            for (pid, text, kind), lab, s in zip(candidates, labels, sims)
        ]
    suite = Suite(
        "organism",
        splits,
        {
            "settings": settings,
            "criterion": rule.describe(),
            "labels": "measured replication of a memorized training image",
        },
    )
    if path is not None:
        atomic_write_json(path, suite.to_dict())
    return suite
