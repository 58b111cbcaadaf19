"""ScoredRouter: a learned linear scorer, one row per expert (logits = h W^T in float32), shared by the routers
that choose differently from the same scores: top_p, expert_choice, smear."""
from __future__ import annotations

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from .base import Router


class ScoredOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    init_std: float = Field(0.02, ge=0.0, description="std of the scorer's initial weights")


class ScoredRouter(Router):
    Options = ScoredOptions
    supports_always_on_base = False

    def __init__(self, **kw):
        super().__init__(**kw)
        self.weight = nn.Parameter(torch.randn(len(self.expert_names), self.d_in) * self.options.init_std)  # [E, d]

    def logits(self, h: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """h [T,d] -> [T,E] float32, -inf for experts not allowed."""
        return (h.float() @ self.weight.float().T).masked_fill(~allowed, float("-inf"))

    def add_expert(self, name: str) -> None:
        row = torch.randn(1, self.d_in, device=self.weight.device) * self.options.init_std
        self.weight = nn.Parameter(torch.cat([self.weight.data, row]))
        super().add_expert(name)

    def remove_expert(self, name: str) -> None:
        i = self.expert_names.index(name)
        self.weight = nn.Parameter(torch.cat([self.weight.data[:i], self.weight.data[i + 1:]]))
        super().remove_expert(name)
