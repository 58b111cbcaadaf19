"""Uniform router: every (enabled) expert of the site, equal weight; the base too with always_on_base."""
from __future__ import annotations

from ..nn.routing import RouteInput, Routing, uniform_routing
from .base import ROUTERS, Router


@ROUTERS.register("uniform")
class UniformRouter(Router):
    def forward(self, inp: RouteInput) -> Routing:
        return uniform_routing(inp.h.shape[0], inp.allowed, with_base=self.always_on_base)
