"""``extended_call``: the wrapper's signature follows the stock one, also when diffusers adds a parameter."""

from __future__ import annotations

import inspect

import pytest

from diffmem.guard.signature import extended_call, keyword


class Stock:
    def __call__(self, prompt=None, steps: int = 50, new_in_a_later_release: str = "x", **kwargs):
        """Stock docstring."""
        return {"prompt": prompt, "steps": steps, "new": new_in_a_later_release, "kwargs": kwargs}


def implementation(self, stock, own, extra):
    return {**Stock.__call__(self, **stock, **extra), "own": own}


class Wrapped(Stock):
    __call__ = extended_call(Stock.__call__, [keyword("threshold", None)], implementation, doc="Wrapper doc.")


def test_signature_is_stock_plus_own_and_a_new_stock_parameter_passes_through():
    params = list(inspect.signature(Wrapped.__call__).parameters)
    assert params == ["self", "prompt", "steps", "new_in_a_later_release", "threshold", "kwargs"]
    out = Wrapped()("a cat", 3, new_in_a_later_release="y", threshold=1.0, deprecated_callback=1)
    assert out == {
        "prompt": "a cat",
        "steps": 3,
        "new": "y",
        "kwargs": {"deprecated_callback": 1},
        "own": {"threshold": 1.0},
    }
    doc = inspect.getdoc(Wrapped.__call__)
    assert doc.startswith("Wrapper doc.") and "Stock docstring." in doc


def test_wrong_calls_fail_as_on_stock():
    with pytest.raises(TypeError):
        Wrapped()("a", 1, "y", 2)  # the guard's arguments are keyword-only
    with pytest.raises(TypeError, match="stock arguments already"):
        extended_call(Stock.__call__, [keyword("steps", 1)], implementation, doc="")
