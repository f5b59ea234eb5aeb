"""``diffmem <command>``: argument parsing and dispatch only; the work lives in the library."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

from diffmem import __version__
from diffmem.cli_args import OneLineParser, check_numeric_options
from diffmem.io import ALLOW_PICKLE_ENV

# peft imports bitsandbytes, whose CPU backend (on CPUs with AVX512-BF16) warns at import about a 4-bit kernel
# diffmem never uses: silenced before the commands (and so peft) are imported, or every error is two lines
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

#: Environment variable: a traceback on errors (as --debug); ALLOW_PICKLE_ENV is --allow-pickle's.
DEBUG_ENV = "DIFFMEM_DEBUG"

# Subcommand modules under diffmem/commands/, in the order --help lists them.
COMMANDS = [
    "demo",
    "detect",
    "organism",
    "localize",
    "prune",
    "attack",
    "finetune",
    "train",
    "memcontrol",
    "solidmark",
    "embed",
    "index",
    "scan",
    "bench",
]


#: An OSError over a path of the wrong kind (the user's input): what it says instead of errno's text.
_PATH_KINDS = {
    errno.EEXIST: "a file is in the way (a folder was expected there)",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder; a file was expected",
}


class UsageError(Exception):
    """Bad input from the user: printed as ``diffmem: error: ...`` with exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="diffmem",
        description="Find, measure, localize and remove training-data memorization in text-to-image diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)",
    )
    parser.add_argument(
        "--allow-pickle",
        dest="allow_pickle_weights",  # not the scan command's own --allow-pickle (its embedder file)
        action="store_true",
        help=f"allow pickle-based weight files (.bin, .pt, .ckpt) where safetensors are missing (also: {ALLOW_PICKLE_ENV}=1)",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"diffmem.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"diffmem.commands.{name}":
                continue  # not built yet
            raise
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    check_numeric_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input: one line ``diffmem <command>: error: ...`` and exit code 2; any
    other failure: one line naming the error and exit code 1; a traceback only with ``--debug``."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad argument (its one line is printed)
        return int(exit_.code or 0)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    previous = os.environ.get(ALLOW_PICKLE_ENV)
    if args.allow_pickle_weights:
        os.environ[ALLOW_PICKLE_ENV] = "1"
    try:
        return run_with_error_boundary(f"diffmem {args.command}", args._run, args, debug=args.debug)
    finally:
        if previous is None:
            os.environ.pop(ALLOW_PICKLE_ENV, None)
        else:
            os.environ[ALLOW_PICKLE_ENV] = previous


def run_with_error_boundary(
    name: str,
    run: Callable[[argparse.Namespace], int | None],
    args: argparse.Namespace,
    *,
    debug: bool = False,
) -> int:
    """``run(args)`` behind the error boundary every entry point shares: bad input is one line
    ``<name>: error: ...`` and exit code 2; any other failure one line naming the error and exit code 1;
    an interrupt says how to resume (130); a traceback only with ``debug`` or ``DIFFMEM_DEBUG=1``."""
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    # a deprecation inside diffusers' own hub call, not the user's doing: it would be a second error line
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*", category=UserWarning)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            raise
        user_error = isinstance(err, (UsageError, ValueError, FileNotFoundError, NotADirectoryError))
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, OSError) and err.errno in _PATH_KINDS and err.filename is not None:
            user_error, text = True, f"{err.filename}: {_PATH_KINDS[err.errno]}"  # a path of the wrong kind
        if not user_error:
            text = f"{type(err).__name__}: {text} (rerun with --debug for the traceback)"
        print(f"{name}: error: {text}", file=sys.stderr)
        return 2 if user_error else 1


if __name__ == "__main__":
    raise SystemExit(main())
