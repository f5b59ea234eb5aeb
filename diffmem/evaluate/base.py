"""The evaluation protocol and its registry: every evaluation `diffmem bench <name>` reaches is one class.

An :class:`Evaluation` declares its own arguments (``add_arguments``), refuses bad settings before any
model loads (``check``), and runs its flow (``run``) resumably in its output folder, returning an
:class:`EvaluationResult` (JSON-able results, a Markdown table, the report files it wrote). The command
line adds what every evaluation shares (``--model``, ``--out``, the device, dtype and attention settings,
``--no-progress``) and hands ``run`` a loader, so an evaluation never parses devices or loads weights
itself. A new evaluation is one module in ``diffmem/evaluate/`` with a class decorated with
:func:`register_evaluation` and the module named in :data:`BUILTIN_MODULES`, as lm-evaluation-harness's
tasks are.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from diffmem.io import atomic_write_json, atomic_write_text
from diffmem.registry import Registry

__all__ = [
    "EVALUATIONS",
    "Evaluation",
    "EvaluationResult",
    "ModelLoader",
    "get_evaluation",
    "parse_method_specs",
    "register_evaluation",
]

#: ``load_model(pipeline_class=None)``: the pipeline of ``--model`` on the run's device (default class:
#: the guarded one for the folder; a stock class where the evaluation asks for one).
ModelLoader = Callable[..., Any]


@dataclass
class EvaluationResult:
    """What an evaluation gives back: ``results`` (JSON-able), ``table`` (Markdown) and the files it wrote."""

    results: Any
    table: str
    files: list[str] = field(default_factory=list)

    def write(self, out: str | Path) -> list[Path]:
        """``out/results.json`` and ``out/table.md``, each written atomically."""
        out = Path(out)
        atomic_write_json(out / "results.json", self.results)
        atomic_write_text(out / "table.md", self.table)
        return [out / "results.json", out / "table.md"]


class Evaluation:
    """One registered evaluation, built from the parsed arguments (its own and the shared ones)."""

    name: ClassVar[str] = ""
    help: ClassVar[str] = ""
    #: where results go without ``--out`` (``None``: ``runs/bench-<name>``)
    default_out: ClassVar[str | None] = None
    #: the registry of the methods the evaluation ranks, if it ranks methods (``--list`` names them)
    registry: ClassVar[Registry | None] = None

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The evaluation's own arguments (the shared ones are added by the command line)."""

    @classmethod
    def out_folder(cls) -> str:
        """Where results go when ``--out`` is not given."""
        return cls.default_out or f"runs/bench-{cls.name}"

    def check(self) -> None:
        """Refuse bad settings with one ``ValueError`` line before any model loads."""

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        """The flow, resumable in ``self.args.out``; a rerun reuses every finished stage."""
        raise NotImplementedError(f"{type(self).__name__}.run")


BUILTIN_MODULES = (
    "diffmem.evaluate.method_bench",
    "diffmem.evaluate.robustness_bench",
    "diffmem.evaluate.localization_bench",
    "diffmem.evaluate.organism_bench",
    "diffmem.evaluate.sd_likeness",
    "diffmem.evaluate.organism_scan",
    "diffmem.evaluate.training_mitigations",
    "diffmem.evaluate.solidmark",
)

EVALUATIONS: Registry[Evaluation] = Registry("evaluation", Evaluation, BUILTIN_MODULES)
register_evaluation = EVALUATIONS.register


def get_evaluation(name: str) -> type[Evaluation]:
    """The registered evaluation class ``name`` (``ValueError`` listing the registered ones otherwise)."""
    return EVALUATIONS.get_class(name)


def parse_method_specs(
    text: str | None, available: Sequence[str], argument: str = "--methods"
) -> list[tuple[str, dict]]:
    """``"a,b:k=1;j=x"`` -> ``[("a", {}), ("b", {"k": 1, "j": "x"})]`` (values are JSON where they parse);
    ``None`` -> every name in ``available`` with no options."""

    if text is None:
        return [(name, {}) for name in available]
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, rest = item.partition(":")
        if name not in available:
            raise ValueError(f"{argument}: {name!r} is not registered; registered: {', '.join(available)}")
        options = {}
        for pair in filter(None, rest.split(";")):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise ValueError(f"{argument}: expected key=value in {item!r}, got {pair!r}")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        out.append((name, options))
    if not out:
        raise ValueError(f"{argument}: no method named")
    return out
