"""Zoo of Experts: mix heterogeneous expert modules (LoRA, MLP, FFN copies, ...) into a pretrained causal LM.

Importing the package is cheap: each public name is imported on first use (so `zoo --help` never loads torch).
The transformers model type `zoo` is registered with the Auto classes as soon as transformers' Auto models are
imported, in this process, before or after `import expertzoo`."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "ExpertSpec": "config", "RouterSpec": "config", "ZooConfig": "config", "load_config": "config",
    "ZooError": "errors", "EXPERTS": "experts", "Expert": "experts", "ROUTERS": "routers", "Router": "routers",
    "load_base": "io.base_models", "ZooLayer": "nn.layer", "BASE": "nn.routing", "NULL": "nn.routing",
    "Routing": "nn.routing", "Zoo": "zoo", "load": "build.load",
}
__all__ = sorted([*_PUBLIC, "build"])
_AUTO_MODELS = "transformers.models.auto.modeling_auto"


def __getattr__(name: str) -> Any:
    if name == "build":  # the package expertzoo.build, callable as the function build
        return importlib.import_module(".build", __name__)
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


class _RegisterZooModelType(importlib.abc.MetaPathFinder):
    """Once transformers' Auto models module has been executed, import expertzoo.export, which registers the
    `zoo` model type with AutoConfig and AutoModelForCausalLM."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != _AUTO_MODELS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_then_register(module: Any) -> None:
            run(module)
            importlib.import_module(".export", __name__)

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _AUTO_MODELS in sys.modules:
    importlib.import_module(".export", __name__)
else:
    sys.meta_path.insert(0, _RegisterZooModelType())
