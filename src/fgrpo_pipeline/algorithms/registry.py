"""A tiny name → object registry, so configuration selects algorithms by string.

Adding a divergence, loss, reward or rollout engine is one decorated definition; an
unknown name fails with the list of valid ones instead of a deep ``KeyError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Holds named entries of one kind (e.g. ``"divergence"``)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a duplicate name is a programming error."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The entry called ``name``; ``ValueError`` listing the valid names otherwise."""
        self.check(name)
        return self._entries[name]

    def check(self, name: object, parameter: str | None = None) -> None:
        """Raise a ``ValueError`` naming ``parameter`` if ``name`` is not registered."""
        if not isinstance(name, str) or name not in self._entries:
            where = f" (parameter {parameter!r})" if parameter else ""
            raise ValueError(
                f"unknown {self.kind} {name!r}{where}; valid {self.kind} names: "
                f"{', '.join(self.names())}"
            )

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
