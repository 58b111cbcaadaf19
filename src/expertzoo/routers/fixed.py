"""Fixed router: always the listed experts, equal weight; `experts: []` is the base alone (oracle, steering)."""
from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict

from ..nn.routing import BASE, NULL, RouteInput, Routing, fixed_routing
from .base import ROUTERS, Router


class FixedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    experts: list[str] = []


@ROUTERS.register("fixed")
class FixedRouter(Router):
    Options = FixedOptions

    def forward(self, inp: RouteInput) -> Routing:
        """The listed experts' slots, then a BASE slot: equal weights over the allowed listed experts (and the base
        with always_on_base); the base alone when none of them is allowed. Disabled experts' slots are NULL."""
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        listed = [self.expert_names.index(n) for n in self.options.experts if n in self.expert_names]
        if not listed:
            return fixed_routing(h.shape[0], [], h.device)
        idx = torch.tensor(listed, dtype=torch.long, device=h.device)  # [L]
        on = allowed[idx].float()  # [L]
        n_on = on.sum()
        if self.always_on_base:
            w = torch.cat([on, on.new_ones(1)]) / (n_on + 1.0)  # [L+1]
            last = idx.new_tensor([BASE])
        else:  # the BASE slot only when no listed expert is allowed (else NULL, weight 0)
            w = torch.cat([on / n_on.clamp(min=1.0), (n_on == 0).float().unsqueeze(0)])  # [L+1]
            last = torch.where(n_on == 0, BASE, NULL).reshape(1).to(idx.dtype)
        idx = torch.cat([idx.masked_fill(on == 0, NULL), last])  # [L+1]
        return Routing(weights=w.expand(h.shape[0], -1), indices=idx.expand(h.shape[0], -1))
