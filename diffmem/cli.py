"""``diffmem <command>``: argument parsing and dispatch only; the work lives in the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from diffmem import __version__

# Subcommand modules under diffmem/commands/, in the order --help lists them.
COMMANDS = [
    "demo",
    "detect",
    "organism",
    "localize",
    "prune",
    "attack",
    "finetune",
    "solidmark",
    "scan",
    "bench",
]


class UsageError(Exception):
    """Bad input from the user: printed as ``diffmem: error: ...`` with exit code 2, no traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffmem",
        description="Find, measure, localize and remove training-data memorization in text-to-image diffusion models.",
    )
    parser.add_argument("--version", action="version", version=f"diffmem {__version__}")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except UsageError as err:
        print(f"diffmem {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as err:
        # the library raises these with messages that name the argument, file or row at fault
        print(f"diffmem {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmem {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
