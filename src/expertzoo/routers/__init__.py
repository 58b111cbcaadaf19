"""Router kinds, one per file, each registered in ROUTERS."""
from .base import ROUTERS, Router
from . import fixed, learned, uniform  # noqa: F401  (registers the kinds)

__all__ = ["ROUTERS", "Router"]
