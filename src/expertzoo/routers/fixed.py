"""Fixed router: always the listed experts, equal weight; `experts: []` is the base alone (oracle, steering)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from ..nn.routing import BASE, RouteInput, Routing, fixed_routing
from .base import ROUTERS, Router


class FixedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    experts: list[str] = []


@ROUTERS.register("fixed")
class FixedRouter(Router):
    Options = FixedOptions

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        on = allowed.tolist()
        idx = [self.expert_names.index(n) for n in self.options.experts if n in self.expert_names]
        idx = [i for i in idx if on[i]]
        if self.always_on_base and idx:
            idx.append(BASE)
        return fixed_routing(h.shape[0], idx, h.device)
