"""One registry mechanism for every kind of method (detectors, mitigations): a new method is one class.

A :class:`Registry` maps names to classes of one base; ``register`` is a class decorator, ``create``
builds an instance from a name and keyword options (or passes an instance through). Built-in methods
register themselves when their modules are imported, which happens on the first lookup.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Name -> class of ``base`` (``kind`` names the methods in messages, e.g. ``"mitigation"``)."""

    def __init__(self, kind: str, base: type, builtin_modules: Sequence[str] = ()):
        self.kind, self.base, self.builtin_modules = kind, base, tuple(builtin_modules)
        self._classes: dict[str, type] = {}

    def register(self, cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, self.base)) or not getattr(cls, "name", ""):
            raise TypeError(f"register: expected a {self.base.__name__} subclass with a non-empty name")
        existing = self._classes.get(cls.name)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"{'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind} named {cls.name!r} is registered "
                f"already ({existing.__qualname__})"
            )
        self._classes[cls.name] = cls
        return cls

    def _load_builtins(self) -> None:
        for module in self.builtin_modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        self._load_builtins()
        return sorted(self._classes)

    def get_class(self, name: str) -> type:
        self._load_builtins()
        if name not in self._classes:
            raise ValueError(
                f"{self.kind}={name!r} is not registered; registered: {', '.join(map(repr, sorted(self._classes)))} "
                f"(or pass a {self.base.__module__}.{self.base.__name__} object)"
            )
        return self._classes[name]

    def check_options(self, name: str, options: Mapping[str, Any]) -> None:
        """Refuse option names the registered class ``name`` does not take (before anything is built)."""
        accepted = _options_of(self.get_class(name))
        unknown = [k for k in options if accepted is not None and k not in accepted]
        if unknown:
            raise ValueError(
                f"{self.kind}_options for {name!r}: no option {', '.join(map(repr, unknown))}; "
                f"its options: {', '.join(accepted) or 'none'}"
            )

    def create(self, spec: str | T, options: Mapping[str, Any] | None = None) -> T:
        """An instance from a registered name (built with ``options``) or an instance of ``base`` as it is."""
        if isinstance(spec, self.base):
            if options:
                raise ValueError(
                    f"{self.kind}_options are for a {self.kind} given by name; set them on the object"
                )
            return spec
        if not isinstance(spec, str):
            raise ValueError(
                f"{self.kind}: expected a registered name or a {self.base.__name__}, got {type(spec).__name__}"
            )
        cls = self.get_class(spec)
        options = dict(options or {})
        self.check_options(spec, options)
        try:
            return cls(**options)
        except TypeError as err:  # e.g. a required option left out: the message without the class's name
            raise ValueError(f"{self.kind}_options for {spec!r}: {str(err).split('() ', 1)[-1]}") from None


def _options_of(cls: type) -> list[str] | None:
    """The keyword options a class's constructor takes (``None``: any, it takes ``**kwargs``)."""
    if cls.__init__ is object.__init__:
        return []
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]
