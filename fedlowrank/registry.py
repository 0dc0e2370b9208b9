"""A name -> class registry filled by a class decorator (codecs, aggregation rules).

The pattern of Opacus' ``register_grad_sampler``: a new codec or rule plugs in by
decorating its class, without touching the module that looks it up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Classes by name; :meth:`register` sets ``cls.name`` and refuses a name taken by another.

    Parameters
    ----------
    kind : str
        What is registered, for error messages ("Codec", "Rule").
    valid : callable
        ``name -> bool``: whether a name is well formed.
    rule : str
        How a valid name looks, for the error message.
    """

    def __init__(self, kind: str, valid: Callable[[str], bool], rule: str) -> None:
        self.kind, self.valid, self.rule = kind, valid, rule
        self.classes: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator registering the class under ``name``."""
        if not name or not self.valid(name):
            raise ValueError(f"Invalid {self.kind.lower()} name {name!r}: {self.rule}.")

        def decorator(cls: T) -> T:
            if name in self.classes and self.classes[name] is not cls:
                raise ValueError(f"{self.kind} name {name!r} is already registered by {self.classes[name]}.")
            cls.name = name
            self.classes[name] = cls
            return cls

        return decorator

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self.classes)
