"""Model precision by name: the ``--dtype`` spellings and the torch dtypes they stand for.

The model's weights and activations run in the chosen dtype; what diffmem computes from them
(statistics, scores, similarities) is kept in float32 or float64 whatever the model's dtype.
This module imports torch only when a name is resolved, so command-line parsing stays fast.
"""

from __future__ import annotations

__all__ = ["DTYPES", "dtype_name", "torch_dtype"]

#: The precisions a model can be loaded in.
DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str, argument: str = "--dtype"):
    """The torch dtype called ``name`` (one of :data:`DTYPES`); an error naming ``argument`` otherwise."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"{argument}: expected one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """``"float16"`` for ``torch.float16``: the name a record stores."""
    return str(dtype).removeprefix("torch.")
