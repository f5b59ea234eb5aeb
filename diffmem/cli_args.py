"""Numbers checked where they are parsed: every numeric option of every ``diffmem`` command.

:func:`check_numeric_options` replaces the ``type`` of each ``int``/``float`` option by a checked one,
chosen by the option's name, so a new option is covered without code of its own:

* every float must be finite (``nan``, ``inf`` are refused); thresholds, learning rates, fractions and
  weights must be >= 0 (``lr`` > 0);
* every int must be >= 1 (steps, seeds, sizes, counts, batches), except seeds, window starts and the
  options where 0 means "none" (:data:`ZERO_ALLOWED`), which must be >= 0.

Range checks that depend on other options (a window inside the schedule, NeMo's timestep index)
are made by the commands, which know the schedule.
"""

from __future__ import annotations

import argparse
import math

#: Integer options for which 0 is meaningful (a seed, an offset, "none").
ZERO_ALLOWED = frozenset(
    {"seed", "start", "keep_images", "ssim_rerank", "background_sample", "snapshot_every", "checkpoint_every"}
)
#: Float options that must be > 0.
POSITIVE = frozenset({"lr", "attack_lr", "eps_ball"})


def _int_type(dest: str):
    low = 0 if dest in ZERO_ALLOWED else 1

    def checked_int(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return checked_int


def _float_type(dest: str):
    def checked_float(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if dest in POSITIVE and value <= 0:
            raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
        return value

    return checked_float


def check_numeric_options(parser: argparse.ArgumentParser) -> None:
    """Swap the ``type`` of every ``int``/``float`` option of ``parser`` and its subcommands for a checked one."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                check_numeric_options(sub)
        elif action.type is int:
            action.type = _int_type(action.dest)
        elif action.type is float:
            action.type = _float_type(action.dest)


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, ``diffmem <command>: error: ...``, exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
