"""Zoo of Experts: mix heterogeneous expert modules (LoRA, MLP, FFN copies, ...) into a pretrained causal LM."""
from .base_models import load_base
from .config import ExpertSpec, RouterSpec, ZooConfig, load_config
from .errors import ZooError
from .experts import EXPERTS, Expert
from .layer import ZooLayer
from .routers import ROUTERS, Router
from .routing import BASE, NULL, Routing
from .zoo import Zoo, build, load
from . import export  # noqa: E402,F401  (registers the `zoo` model type with transformers' Auto classes)

__all__ = [
    "BASE", "EXPERTS", "NULL", "ROUTERS", "Expert", "ExpertSpec", "Router", "RouterSpec", "Routing",
    "Zoo", "ZooConfig", "ZooError", "ZooLayer", "build", "load", "load_base", "load_config",
]
__version__ = "0.1.0"
