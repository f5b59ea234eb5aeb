"""``detection`` and ``mitigation``: every registered detector or mitigation on one labelled ground truth.

``--methods`` takes registered names, each with optional settings: ``wen,wen:steps=5,ren-entropy``.
``--suite organism`` (default) builds the organism's splits (measured labels cached in ``--out``);
otherwise ``--suite`` takes prompt-set files (Wen's JSONL, MemBench's CSV, ``*_mem``/``*_nmem`` folders,
Webster's parquet, a negatives ``.txt``), pooled into one split. ``--out`` gets ``results.json``,
``table.md`` and ``report.html``; a rerun resumes from the cached scores.
"""

from __future__ import annotations

import argparse

from diffmem.detectors import DETECTORS, get_detector
from diffmem.evaluate.base import (
    Evaluation,
    EvaluationResult,
    ModelLoader,
    parse_method_specs,
    register_evaluation,
)
from diffmem.evaluate.detection import evaluate_detectors
from diffmem.evaluate.mitigation import (
    evaluate_mitigations,
    mitigation_markdown,
    organism_nemo,
    write_mitigation_report,
)
from diffmem.evaluate.report import detection_markdown, write_detection_report
from diffmem.evaluate.suites import MEASURED_SPLITS, Suite, organism_suite, suite_from_rows
from diffmem.io import atomic_write_json
from diffmem.mitigations.base import MITIGATIONS, get_mitigation
from diffmem.prompt_sets import read_prompt_set

__all__ = ["DetectionBench", "MethodBench", "MitigationBench"]


class MethodBench(Evaluation):
    """What the detection and mitigation benches share: methods from a registry, a suite, the generation settings."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        kind = cls.registry.kind
        parser.add_argument(
            "--list", action="store_true", help=f"print the registered {kind} names, one per line"
        )
        parser.add_argument(
            "--methods", default=None, help="comma-separated names[:key=value;...] (default: all)"
        )
        parser.add_argument("--suite", nargs="+", default=["organism"], help="'organism' or prompt-set files")
        parser.add_argument("--num-gens", type=int, default=4, help="generations per prompt (default 4)")
        parser.add_argument("--seed", type=int, default=0, help="base seed of every noise draw (default 0)")
        parser.add_argument(
            "--num-inference-steps", type=int, default=None, help="schedule (organism: 25, else 50)"
        )
        parser.add_argument(
            "--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)"
        )
        parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
        parser.add_argument(
            "--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals"
        )

    def check(self) -> None:
        self.methods = parse_method_specs(self.args.methods, self.registry.names())
        for name, options in self.methods:  # option names checked before any model loads
            self.registry.check_options(name, options)
        self.prompt_suite = self._prompt_suite()

    @property
    def on_organism(self) -> bool:
        return self.args.suite == ["organism"]

    def _prompt_suite(self) -> Suite | None:
        """The suite of ``--suite`` prompt files (read before any model loads), or ``None`` for the organism.
        Detection needs both classes: a pool without memorized or without clean prompts is refused."""

        if self.on_organism:
            return None
        rows = [r for path in self.args.suite for r in read_prompt_set(path)]
        memorized = sum(r["label"] == 1 for r in rows)
        if memorized in (0, len(rows)):
            have, need = ("memorized", "not-memorized") if memorized else ("not-memorized", "memorized")
            raise ValueError(
                f"--suite: {', '.join(self.args.suite)}: {len(rows)} {have} prompt(s) and no {need} one; "
                f"AUC and TPR need both classes: add a file of {need} prompts "
                "(negatives: a .txt file, *_nmem*.txt lists or overfit_type N; memorized: Wen's JSONL, MemBench's "
                "CSV, *_mem*.txt lists or overfit_type MV/RV/TV)"
            )
        return suite_from_rows("prompt files", rows)

    def suite(self, pipe, measured: bool) -> Suite:
        """The organism's splits (with the measured ones if ``measured``) or the prompt files' one."""
        if self.prompt_suite is None:
            return organism_suite(
                pipe,
                self.args.out,
                seed=self.args.seed,
                measured=measured,
                progress=not self.args.no_progress,
            )
        atomic_write_json(f"{self.args.out}/suite.json", self.prompt_suite.to_dict())
        return self.prompt_suite

    def generation_settings(self) -> dict:
        args = self.args
        return dict(
            num_gens=args.num_gens,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps or (25 if self.on_organism else 50),
            guidance_scale=args.guidance_scale,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )


@register_evaluation
class DetectionBench(MethodBench):
    name = "detection"
    help = "rank the registered detectors (AUC, TPR at 1% FPR with intervals, cost) on every split"
    registry = DETECTORS

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--splits",
            default=None,
            help="comma-separated splits of the suite to rank on (default: all; e.g. copies-2-vs-1)",
        )

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        splits = self.args.splits
        wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
        pipe = load_model()
        suite = self.suite(pipe, measured=wanted is None or any(s in MEASURED_SPLITS for s in wanted))
        if wanted is not None:
            unknown = [s for s in wanted if s not in suite.splits]
            if unknown:
                raise ValueError(
                    f"--splits: {', '.join(unknown)} not in the suite; its splits: {', '.join(suite.splits)}"
                )
            suite.splits = {s: suite.splits[s] for s in wanted}
        detectors = [get_detector(name, options) for name, options in self.methods]
        results = evaluate_detectors(
            pipe, suite, detectors, self.args.out, n_boot=self.args.bootstrap, **self.generation_settings()
        )
        report = write_detection_report(results, self.args.out)
        return EvaluationResult(results, detection_markdown(results), [str(report)])


@register_evaluation
class MitigationBench(MethodBench):
    name = "mitigation"
    help = "rank the registered mitigations (replication with intervals, clean fidelity, added time)"
    registry = MITIGATIONS

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--threshold",
            type=float,
            default=None,
            help="first-step flag threshold (default: the model's calibration)",
        )
        parser.add_argument(
            "--triggers",
            type=int,
            default=20,
            help="trigger prompts (never trained on, measured to copy) in the first scenario, at most "
            "(default 20; 0: memorized captions only)",
        )

    def check(self) -> None:
        if not self.on_organism:
            raise ValueError(
                "--suite: the mitigation bench measures replication on the organism's training images; "
                "use --suite organism"
            )
        if self.args.triggers < 0:
            raise ValueError(f"--triggers: expected 0 or more trigger prompts, got {self.args.triggers}")
        super().check()

    def run(self, load_model: ModelLoader) -> EvaluationResult:
        pipe = load_model()
        # the triggers split is measured (generations of the model, cached in --out)
        suite = self.suite(pipe, measured=self.args.triggers > 0)
        triggers = [p for p in suite.splits.get("triggers", []) if p.label == 1][: self.args.triggers]
        progress = not self.args.no_progress
        built = []
        for name, options in self.methods:
            if (
                name == "nemo" and not options
            ):  # NeMo as deployed: statistics and threshold from clean captions
                reference = [p.prompt for p in suite.splits["memorized-vs-clean"] if p.label == 0]
                built.append((name, options, organism_nemo(pipe, reference, progress)))
            else:
                built.append((name, options, get_mitigation(name, options)))
        results = evaluate_mitigations(
            pipe, suite, built, self.args.out, triggers=triggers, threshold=self.args.threshold,
            **self.generation_settings(),
        )  # fmt: skip
        report = write_mitigation_report(results, self.args.out)
        return EvaluationResult(results, mitigation_markdown(results), [str(report)])
