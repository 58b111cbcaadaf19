"""Router kinds, one per file, each registered in ROUTERS."""
from .base import ROUTERS, Router
from . import fixed, learned, uniform  # noqa: F401  (registers the kinds)
from . import arrow, centroid, expert_choice, phatgoose, rnd, rnd_lowrank, smear, top_p  # noqa: F401

__all__ = ["ROUTERS", "Router"]
