"""Registry[T]: name -> class tables for expert and router kinds; each kind registers itself with one call.
The two tables live here, below the config, so the config validates kind options without importing the kinds."""
from __future__ import annotations

import re
from typing import Callable, Generic, Iterator, TypeVar

from .errors import ZooError

T = TypeVar("T")
KIND_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class Registry(Generic[T]):
    """A checked table of kinds: `@REGISTRY.register("lora")` on a class, `REGISTRY.get("lora")` to find it."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, type[T]] = {}

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        if not KIND_RE.fullmatch(name):
            raise ValueError(f"{self.what} kind {name!r} is malformed; use lowercase letters, digits and '_', e.g. 'top_p'")
        if name in self._items:
            raise ValueError(f"{self.what} kind {name!r} is registered twice; rename one of them")

        def wrap(cls: type[T]) -> type[T]:
            cls.kind = name  # type: ignore[attr-defined]
            self._items[name] = cls
            return cls

        return wrap

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise ZooError(f"unknown {self.what} kind {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        """The kind names, sorted: `for kind in EXPERTS`, `list(ROUTERS)`."""
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"<{self.what} kinds: {', '.join(self.names())}>"


EXPERTS: Registry = Registry("expert")  # filled by expertzoo.experts (one file per kind)
ROUTERS: Registry = Registry("router")  # filled by expertzoo.routers (one file per kind)
