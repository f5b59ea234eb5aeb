"""``diffmem bench detection|mitigation``: every registered method on one ground truth, one table.

``--methods`` takes registered names, each with optional settings: ``wen,wen:steps=5,ren-entropy``.
``--suite organism`` (default) builds the organism's splits (measured labels cached in ``--out``);
otherwise ``--suite`` takes prompt-set files (Wen's JSONL, MemBench's CSV, ``*_mem``/``*_nmem`` folders,
Webster's parquet, a negatives ``.txt``), pooled into one split. ``--out`` gets ``results.json``,
``table.md`` and ``report.html``; a rerun resumes from the cached scores.
"""

from __future__ import annotations

import argparse
import json

from diffmem.cli import UsageError
from diffmem.commands.options import add_runtime_arguments, load_model
from diffmem.detectors import get_detector
from diffmem.evaluate.detection import evaluate_detectors
from diffmem.evaluate.mitigation import (
    evaluate_mitigations,
    mitigation_markdown,
    organism_nemo,
    write_mitigation_report,
)
from diffmem.evaluate.report import detection_markdown, write_detection_report
from diffmem.evaluate.suites import MEASURED_SPLITS, organism_suite, suite_from_rows
from diffmem.io import atomic_write_json, atomic_write_text
from diffmem.mitigations import get_mitigation
from diffmem.prompt_sets import read_prompt_set

NAME = "bench"
HELP = "Compare the registered detectors or mitigations on one labelled ground truth (the organism's splits or prompt files)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="<kind>")
    for kind in ("detection", "mitigation"):
        p = sub.add_parser(kind, help=f"rank the registered {kind} methods")
        p.add_argument("--list", action="store_true", help="print the registered method names, one per line")
        p.add_argument("--methods", default=None, help="comma-separated names[:key=value;...] (default: all)")
        p.add_argument("--model", default=None, help="model folder or hub id (default: the organism)")
        p.add_argument("--suite", nargs="+", default=["organism"], help="'organism' or prompt-set files")
        if kind == "detection":
            p.add_argument(
                "--splits",
                default=None,
                help="comma-separated splits of the suite to rank on (default: all; e.g. copies-2-vs-1)",
            )
        p.add_argument("--out", default=f"runs/bench-{kind}", help="results folder (resumed if it exists)")
        p.add_argument("--num-gens", type=int, default=4, help="generations per prompt (default 4)")
        p.add_argument("--seed", type=int, default=0, help="base seed of every noise draw (default 0)")
        p.add_argument(
            "--num-inference-steps", type=int, default=None, help="schedule (organism: 25, else 50)"
        )
        p.add_argument(
            "--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)"
        )
        p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (default 8)")
        p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the intervals")
        add_runtime_arguments(p, size=False)
        if kind == "mitigation":
            p.add_argument(
                "--threshold",
                type=float,
                default=None,
                help="first-step flag threshold (default: the model's calibration)",
            )
        p.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_methods(text: str | None, available: list[str]) -> list[tuple[str, dict]]:
    """``"a,b:k=1;j=x"`` -> ``[("a", {}), ("b", {"k": 1, "j": "x"})]`` (values are JSON where they parse)."""

    if text is None:
        return [(name, {}) for name in available]
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        name, _, rest = item.partition(":")
        if name not in available:
            raise UsageError(f"--methods: {name!r} is not registered; registered: {', '.join(available)}")
        options = {}
        for pair in filter(None, rest.split(";")):
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise UsageError(f"--methods: expected key=value in {item!r}, got {pair!r}")
            try:
                options[key] = json.loads(value)
            except json.JSONDecodeError:
                options[key] = value
        out.append((name, options))
    if not out:
        raise UsageError("--methods: no method named")
    return out


def _prompt_suite(args):
    """The suite of ``--suite`` prompt files (read before any model loads), or ``None`` for the organism.
    Detection needs both classes: a pool without memorized or without clean prompts is refused."""

    if args.suite == ["organism"]:
        return None
    if args.bench_command == "mitigation":
        raise UsageError(
            "--suite: the mitigation bench measures replication on the organism's training images; "
            "use --suite organism"
        )
    rows = [r for path in args.suite for r in read_prompt_set(path)]
    memorized = sum(r["label"] == 1 for r in rows)
    if memorized in (0, len(rows)):
        have, need = ("memorized", "not-memorized") if memorized else ("not-memorized", "memorized")
        raise UsageError(
            f"--suite: {', '.join(args.suite)}: {len(rows)} {have} prompt(s) and no {need} one; "
            f"AUC and TPR need both classes: add a file of {need} prompts "
            "(negatives: a .txt file, *_nmem*.txt lists or overfit_type N; memorized: Wen's JSONL, MemBench's "
            "CSV, *_mem*.txt lists or overfit_type MV/RV/TV)"
        )
    return suite_from_rows("prompt files", rows)


def _suite(args, pipe, prompt_suite, progress: bool):

    splits = getattr(args, "splits", None)  # detection only: the mitigation bench uses memorized-vs-clean
    wanted = [s.strip() for s in splits.split(",") if s.strip()] if splits else None
    if prompt_suite is None:  # the mitigation bench needs only the splits of known roles
        measured = args.bench_command == "detection" and (
            wanted is None or any(s in MEASURED_SPLITS for s in wanted)
        )
        suite = organism_suite(pipe, args.out, seed=args.seed, measured=measured, progress=progress)
    else:
        suite = prompt_suite
        atomic_write_json(f"{args.out}/suite.json", suite.to_dict())
    if wanted is not None:
        unknown = [s for s in wanted if s not in suite.splits]
        if unknown:
            raise UsageError(
                f"--splits: {', '.join(unknown)} not in the suite; its splits: {', '.join(suite.splits)}"
            )
        suite.splits = {s: suite.splits[s] for s in wanted}
    return suite


def run(args: argparse.Namespace) -> int:

    if args.bench_command is None:
        raise UsageError("choose what to compare: detection or mitigation")
    if args.bench_command == "detection":
        from diffmem.detectors import DETECTORS as registry
    else:
        from diffmem.mitigations.base import MITIGATIONS as registry
    names = registry.names()
    if args.list:
        print("\n".join(names))
        return 0
    methods = parse_methods(args.methods, names)
    for name, options in methods:  # option names checked before any model loads
        registry.check_options(name, options)

    prompt_suite = _prompt_suite(args)
    pipe = load_model(args)
    progress = not args.no_progress
    suite = _suite(args, pipe, prompt_suite, progress)
    steps = args.num_inference_steps or (25 if args.suite == ["organism"] else 50)
    common = dict(
        num_gens=args.num_gens,
        seed=args.seed,
        num_inference_steps=steps,
        guidance_scale=args.guidance_scale,
        batch_size=args.batch_size,
        progress=progress,
    )
    if args.bench_command == "detection":
        results = evaluate_detectors(
            pipe,
            suite,
            [get_detector(name, options) for name, options in methods],
            args.out,
            n_boot=args.bootstrap,
            **common,
        )
        table = detection_markdown(results)
        report = write_detection_report(results, args.out)
    else:
        built = []
        for name, options in methods:
            if (
                name == "nemo" and not options
            ):  # NeMo as deployed: statistics and threshold from clean captions
                reference = [p.prompt for p in suite.splits["memorized-vs-clean"] if p.label == 0]
                built.append((name, options, organism_nemo(pipe, reference, progress)))
            else:
                built.append((name, options, get_mitigation(name, options)))
        results = evaluate_mitigations(
            pipe,
            suite,
            built,
            args.out,
            threshold=args.threshold,
            **common,
        )
        table = mitigation_markdown(results)
        report = write_mitigation_report(results, args.out)
    atomic_write_json(f"{args.out}/results.json", results)
    atomic_write_text(f"{args.out}/table.md", table)
    print(table)
    print(f"results: {args.out}/results.json, report: {report}")
    return 0
