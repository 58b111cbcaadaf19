"""Assembling zoos: `build` from a config (sources loaded, non-expert parameters averaged, router initialised), `load`
from a zoo folder, and the router inputs both collect.

The package is also callable: `expertzoo.build(config)` is `expertzoo.build.assemble.build(config)`, so the package
`expertzoo.build` and the function `ez.build` are one name, and `ez.build.from_models(...)` works next to
`ez.build("zoo.yaml")`."""
from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["build", "from_adapters", "from_models"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import assemble

        return getattr(assemble, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _CallablePackage(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .assemble import build

        return build(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
