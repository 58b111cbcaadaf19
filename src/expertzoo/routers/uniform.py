"""Uniform router: every (enabled) expert of the site, equal weight; the base too with always_on_base."""
from __future__ import annotations

import torch

from ..nn.routing import BASE, RouteInput, Routing
from .base import ROUTERS, Router


@ROUTERS.register("uniform")
class UniformRouter(Router):
    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        chosen = allowed.nonzero().flatten()  # [E']
        if self.always_on_base:
            chosen = torch.cat([chosen, chosen.new_tensor([BASE])])
        n_tokens = h.shape[0]
        idx = chosen.expand(n_tokens, -1)  # [T,E']
        w = torch.full(idx.shape, 1.0 / max(len(chosen), 1), device=h.device)  # [T,E']
        return Routing(weights=w, indices=idx)
