"""SMEAR router (Muqeeth et al. 2023, "Soft Merging of Experts with Adaptive Routing"): a learned linear scorer
gives softmax weights over every expert, and the layer merges the experts' LoRA A and B by those weights and runs
the one merged expert (Routing.merge) instead of dispatching. Same-shape LoRA experts only. With `granularity:
sequence` the weights come from the causal mean of the sequence so far: one merged expert per sequence prefix."""
from __future__ import annotations

import torch
from pydantic import Field

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
        ranks = {spec.options.get("rank") for spec in experts if spec.kind == "lora"}
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
        if not bool(allowed.any()):
            return Routing(weights=h.new_zeros(n_tokens, 0).float(), indices=h.new_zeros(n_tokens, 0).long(), merge=True)
        logits = self.logits(h, allowed) / self.options.temperature  # [T,E]
        idx = torch.arange(n_experts, device=h.device).masked_fill(~allowed, NULL).expand(n_tokens, -1)  # [T,E]
        return Routing(weights=torch.softmax(logits, dim=-1), indices=idx, logits=logits, merge=True)

    def flops_per_token(self) -> int:
        return 2 * self.weight.numel()
