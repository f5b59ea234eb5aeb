"""A wrapped ``__call__`` whose signature is the stock pipeline's plus the wrapper's own keyword arguments.

diffusers' tests, ``help()`` and tools that build a call from ``inspect.signature`` (``from_pipe``,
the pipeline testers, UIs) must see the stock parameters, so a wrapper cannot hide them behind
``*args, **kwargs``. :func:`extended_call` builds the combined signature from the stock ``__call__``
at import time, so a parameter that a later diffusers adds shows up (and is passed on) unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["extended_call", "keyword"]


def keyword(name: str, default: Any, annotation: Any = inspect.Parameter.empty) -> inspect.Parameter:
    """A keyword-only parameter for :func:`extended_call`."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def extended_call(
    stock_call: Callable,
    own: Sequence[inspect.Parameter],
    implementation: Callable[..., Any],
    *,
    doc: str,
    drop: Sequence[str] = (),
    defaults: dict[str, Any] | None = None,
) -> Callable:
    """``__call__(self, <stock parameters>, *, <own>, **kwargs)`` calling ``implementation(self, stock, own, extra)``.

    ``stock`` holds every stock argument (defaults applied), ``own`` the wrapper's keyword arguments,
    ``extra`` whatever the stock ``**kwargs`` collects (deprecated arguments). ``drop`` removes stock
    parameters the wrapper fixes itself; ``defaults`` changes stock defaults. The docstring is ``doc``
    followed by the stock one.
    """
    stock_sig = inspect.signature(stock_call)
    params = list(stock_sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    plain = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD and p.name not in drop]
    defaults = defaults or {}
    plain = [p.replace(default=defaults[p.name]) if p.name in defaults else p for p in plain]
    taken = {p.name for p in plain}
    clash = [p.name for p in own if p.name in taken]
    if clash:
        raise TypeError(f"the wrapper's arguments {clash} are stock arguments already")
    signature = stock_sig.replace(parameters=[*plain, *own, *var_kw])
    own_names = [p.name for p in own]
    var_kw_name = var_kw[0].name if var_kw else None
    stock_names = [p.name for p in plain if p.name != "self"]

    def __call__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        extra = dict(arguments.get(var_kw_name) or {}) if var_kw_name else {}
        stock = {name: arguments[name] for name in stock_names}
        mine = {name: arguments[name] for name in own_names}
        return implementation(self, stock, mine, extra)

    __call__.__signature__ = signature
    __call__.__doc__ = (
        doc.rstrip()
        + "\n\n"
        + "Stock arguments (passed on unchanged):\n\n"
        + (inspect.getdoc(stock_call) or "")
    )
    __call__.__name__ = "__call__"
    __call__.__qualname__ = "__call__"
    __call__.__wrapped_stock__ = stock_call
    return __call__
