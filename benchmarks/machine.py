"""What machine a benchmark ran on, for the results it writes (the library's :mod:`diffmem.evaluate.machine`)."""

from __future__ import annotations

from diffmem.evaluate.machine import cpu_model

__all__ = ["cpu_model"]
