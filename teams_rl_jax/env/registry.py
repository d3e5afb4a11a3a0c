"""A small name -> object registry used for operations, edit kinds, reward terms, elimination rules
and embedding functions (all chosen by name in ``EnvConfig``)."""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from teams_rl_jax.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Mapping from names to registered objects; unknown names raise a one-line ConfigError."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        """Register ``item`` under ``name`` (a later registration replaces an earlier one)."""
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        """The item registered as ``name``; ConfigError listing the valid names otherwise."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(f"unknown {self.what} {name!r} (registered: {', '.join(sorted(self._items))})") from None

    def names(self) -> tuple[str, ...]:
        """Registered names, in registration order."""
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
