"""Zoo of Experts: mix heterogeneous expert modules (LoRA, MLP, FFN copies, ...) into a pretrained causal LM."""
from .config import ExpertSpec, RouterSpec, ZooConfig, load_config
from .errors import ZooError
from .experts import EXPERTS, Expert
from .io.base_models import load_base
from .nn.layer import ZooLayer
from .nn.routing import BASE, NULL, Routing
from .routers import ROUTERS, Router
from .zoo import Zoo
from .build.load import load
from .build.assemble import build  # binds `expertzoo.build` to the function (the package stays expertzoo.build.*)
from . import export  # noqa: E402,F401  (registers the `zoo` model type with transformers' Auto classes)

__all__ = [
    "BASE", "EXPERTS", "NULL", "ROUTERS", "Expert", "ExpertSpec", "Router", "RouterSpec", "Routing",
    "Zoo", "ZooConfig", "ZooError", "ZooLayer", "build", "load", "load_base", "load_config",
]
__version__ = "0.1.0"
