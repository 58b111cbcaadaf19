"""SMEAR router (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing"): a learned linear scorer
gives softmax weights over every expert, and its `merged_lora` (handed to the layer as Routing.merge) merges the
experts' LoRA A and B by those weights and runs the one merged expert instead of dispatching. Same-shape LoRA
experts only. With `granularity: sequence` the weights come from the causal mean of the sequence so far: one
merged expert per sequence prefix."""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
from pydantic import Field

from ..errors import ZooError
from ..nn.routing import NULL, RouteInput, Routing
from .base import ROUTERS
from .scored import ScoredOptions, ScoredRouter


class SmearOptions(ScoredOptions):
    temperature: float = Field(1.0, gt=0.0)


@ROUTERS.register("smear")
class SmearRouter(ScoredRouter):
    Options = SmearOptions

    @classmethod
    def check_experts(cls, experts) -> None:
        ranks = {spec.options.rank for spec in experts if spec.kind == "lora"}
        for spec in experts:
            if spec.kind != "lora":
                raise ValueError(f"router kind 'smear' merges LoRA experts of one rank, but expert {spec.name!r} is "
                                 f"kind {spec.kind}; use lora experts, or another router kind")
        if len(ranks) > 1:
            raise ValueError(f"router kind 'smear' merges LoRA experts of one rank, but the experts have ranks "
                             f"{sorted(ranks)}; give them one rank, or use another router kind")

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        n_tokens, n_experts = h.shape[0], len(self.expert_names)
        logits = self.logits(h, allowed) / self.options.temperature  # [T,E]
        idx = torch.arange(n_experts, device=h.device).masked_fill(~allowed, NULL).expand(n_tokens, -1)  # [T,E]
        weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # every expert disabled: all 0, the base alone
        return Routing(weights=weights, indices=idx, logits=logits, merge=merged_lora, may_use_base=False)

    def flops_per_token(self) -> int:
        return 2 * self.weight.numel()


def merged_lora(x: torch.Tensor, routing: Routing, experts: Mapping[str, nn.Module], d_out: int) -> torch.Tensor:
    """SMEAR's merged expert, per token: A_t = sum_i w_ti A_i, B_t = sum_i w_ti s_i B_i, delta = B_t A_t x.

    x: [T,d_in] -> delta [T,d_out]. Factorised (two matmuls over the stacked experts, no [T,d_out,r] tensor);
    the experts must be LoRA experts of one rank.
    """
    mods = list(experts.values())
    for name, e in experts.items():
        lora = getattr(e, "kind", None) == "lora"
        if not lora or e.lora_A.shape != mods[0].lora_A.shape:
            what = f"rank {e.lora_A.shape[0]}" if lora else f"kind {e.kind!r}"
            raise ZooError(f"router kind 'smear' merges LoRA experts of one rank, but expert {name!r} has {what}; "
                           "use lora experts of one rank, or another router kind")
    n_tokens = x.shape[0]
    if not mods:
        return x.new_zeros(n_tokens, d_out)
    rank = mods[0].lora_A.shape[0]
    dense = torch.zeros(n_tokens, len(mods), device=x.device)  # [T,E] weight per expert
    dense.scatter_add_(1, routing.indices.clamp(min=0), routing.weights * (routing.indices >= 0))
    dense = dense.to(x.dtype)
    a = torch.cat([e.lora_A for e in mods])  # [E*r, d_in]
    b = torch.cat([e.lora_B * e.scale for e in mods], dim=1)  # [d_out, E*r]
    h = (x @ a.T).view(n_tokens, len(mods), rank)  # [T,E,r]: every expert's A x
    h = (h * dense.unsqueeze(-1)).sum(1)  # [T,r]: the merged A_t x
    z = (dense.unsqueeze(-1) * h.unsqueeze(1)).reshape(n_tokens, -1)  # [T,E*r]: w_ti * (A_t x)
    return z @ b.T  # [T,d_out]: the merged B_t (A_t x)
