"""Top-p router (Huang et al. 2024, "Harder Tasks Need More Experts"): dynamic k per token, the smallest set of
experts whose router probabilities reach p, at most `max_k`, over a learned linear scorer. Unused slots are
NULL, so `load` counts the experts each token really used."""
from __future__ import annotations

import torch
from pydantic import Field

from ..nn.routing import NULL, RouteInput, Routing, balance_loss, normalise_selected, z_loss
from .base import ROUTERS
from .scored import ScoredOptions, ScoredRouter


class TopPOptions(ScoredOptions):
    p: float = Field(0.4, gt=0.0, le=1.0, description="probability mass the chosen experts must reach")
    max_k: int = Field(4, ge=1, description="at most this many experts per token")
    temperature: float = Field(1.0, gt=0.0)


@ROUTERS.register("top_p")
class TopPRouter(ScoredRouter):
    """aux: `balance` (Switch), `z`, and `entropy` (the paper's dynamic loss: low entropy -> fewer experts)."""

    Options = TopPOptions

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        logits = self.logits(h, allowed) / self.options.temperature  # [T,E]
        k = min(self.options.max_k, len(self.expert_names))  # fixed: slots past the mass p (or disabled) are NULL
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [T,E]; every expert disabled: all 0
        top, idx = probs.topk(k, dim=-1)  # [T,k], descending
        keep = ((top.cumsum(-1) - top) < self.options.p) & (top > 0)  # until the mass before reaches p; slot 0 always
        routing = Routing(weights=normalise_selected(top, keep), indices=idx.masked_fill(~keep, NULL), logits=logits,
                          may_use_base=False)
        if self.training:
            finite = logits.masked_fill(~allowed, -1e4)  # disabled experts: no -inf inside the losses
            routing.aux["balance"] = balance_loss(finite, routing.indices, len(self.expert_names))
            routing.aux["z"] = z_loss(finite)
            routing.aux["entropy"] = -(probs * probs.clamp(min=1e-12).log()).sum(-1).mean()
        return routing
