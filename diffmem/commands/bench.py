"""``diffmem bench <evaluation>``: every registered evaluation, one table (``diffmem bench --list``).

``detection`` and ``mitigation`` rank the registered detectors and mitigations on one labelled ground
truth (``diffmem bench detection --list`` names them); the other evaluations are the project's studies
(robustness to the Dori attack, NeMo's localization, ...). Each writes ``results.json`` and ``table.md``
to ``--out`` and resumes from its cached stages. The scripts in ``benchmarks/`` reach the same classes
through :func:`script_main`.
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch

from diffmem.cli import UsageError, run_with_error_boundary
from diffmem.cli_args import OneLineParser, check_numeric_options
from diffmem.commands.options import add_runtime_arguments, load_model
from diffmem.evaluate.base import EVALUATIONS, Evaluation, get_evaluation

NAME = "bench"
HELP = "Run a registered evaluation (detection, mitigation, robustness, ...): one table, resumable; --list names them."


def add_evaluation_arguments(parser: argparse.ArgumentParser, evaluation: type[Evaluation]) -> None:
    """The evaluation's own arguments and the shared ones (model, output folder, device, progress)."""
    evaluation.add_arguments(parser)
    parser.add_argument("--model", default=None, help="model folder or hub id (default: the organism)")
    out = evaluation.out_folder()
    parser.add_argument("--out", default=out, help=f"results folder, resumed if it exists (default {out})")
    add_runtime_arguments(parser, size=False)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="print the registered evaluations, one per line")
    sub = parser.add_subparsers(dest="bench_command", metavar="<evaluation>")
    for name in EVALUATIONS.names():
        evaluation = get_evaluation(name)
        add_evaluation_arguments(
            sub.add_parser(name, help=evaluation.help, description=evaluation.help), evaluation
        )


def run_evaluation(evaluation: type[Evaluation], args: argparse.Namespace) -> int:
    """Check the settings, run the evaluation with the shared model loader, write and print its table."""
    if evaluation.registry is not None and args.list:
        print("\n".join(evaluation.registry.names()))
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    job = evaluation(args)
    job.check()
    result = job.run(functools.partial(load_model, args))
    result.write(args.out)
    print(result.table)
    print(f"results: {args.out}/results.json" + "".join(f", {f}" for f in result.files))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench_command is None:
        if args.list:
            print("\n".join(f"{name}\t{get_evaluation(name).help}" for name in EVALUATIONS.names()))
            return 0
        raise UsageError(f"choose an evaluation: {', '.join(EVALUATIONS.names())} (or --list)")
    return run_evaluation(get_evaluation(args.bench_command), args)


def script_main(name: str, argv: list[str] | None = None, description: str | None = None) -> int:
    """A ``benchmarks/`` script's whole ``main``: the registered evaluation ``name`` with its arguments,
    behind the command line's error boundary (the same run as ``diffmem bench <name>``)."""
    evaluation = get_evaluation(name)
    parser = OneLineParser(prog=sys.argv[0], description=description or evaluation.help)
    add_evaluation_arguments(parser, evaluation)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    check_numeric_options(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return run_with_error_boundary(
        parser.prog, functools.partial(run_evaluation, evaluation), args, debug=args.debug
    )
