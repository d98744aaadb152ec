"""A tiny name -> callable registry, so that every algorithmic choice is selected by name from the config.

An entry may also declare facts about itself (what it needs from the rest of the config), so that config
validation reads the declarations instead of hard-coding names: a registry made with ``info=SomeDataclass``
takes those facts as keyword arguments of ``register`` and builds one ``SomeDataclass`` per entry, so every entry
of that registry declares the same facts (a missing or unknown one fails when the module is imported).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to functions that all share one signature, each with its declared facts.

    >>> ESTIMATORS = Registry("advantage estimator", info=EstimatorInfo)
    >>> @ESTIMATORS.register("gae", needs_critic=True, ...)
    ... def gae(...): ...
    >>> ESTIMATORS.get("gae"), ESTIMATORS.info("gae").needs_critic
    """

    def __init__(self, kind: str, info: type | None = None):
        self.kind = kind
        self.info_type = info  # the facts every entry declares (a dataclass), or None: entries declare nothing
        self._items: dict[str, F] = {}
        self._info: dict[str, Any] = {}

    def register(self, name: str, **facts: Any) -> Callable[[F], F]:
        """Decorator adding ``fn`` under ``name``; ``facts`` are the keyword arguments of ``info_type``."""
        if self.info_type is None:
            if facts:
                raise TypeError(f"{self.kind} {name!r}: this registry's entries declare no facts, got "
                                f"{', '.join(sorted(facts))}")
            info = None
        else:
            try:
                info = self.info_type(**facts)
            except TypeError as e:  # a missing or unknown fact: say which entry
                raise TypeError(f"{self.kind} {name!r}: {e}") from None

        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            self._info[name] = info
            return fn

        return deco

    def unregister(self, name: str) -> None:
        """Remove an entry (tests and plugins that register a temporary one)."""
        self.get(name)
        del self._items[name], self._info[name]

    def get(self, name: str) -> F:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}") from None

    def info(self, name: str) -> Any:
        """The facts ``name`` declared when it was registered (an ``info_type``), or None for a registry without."""
        self.get(name)
        return self._info[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
