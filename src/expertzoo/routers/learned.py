"""Learned router: a linear map to expert (+ null, + base) logits, top-k softmax in float32, optional noise.
`init` sets the expert rows without training, from prompts or data (mergekit's gate modes; see router_init.py)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..nn.routing import RouteInput, Routing, balance_loss, topk_routing, z_loss
from .base import ROUTERS, Router


class LearnedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    jitter: float = Field(0.0, ge=0.0, lt=1.0, description="multiplicative input jitter while training (Switch)")
    noise: float = Field(0.0, ge=0.0, description="std of Gaussian noise on logits while training (noisy top-k)")
    init_std: float = Field(0.02, ge=0.0)
    init: Literal["hidden", "hidden_avg", "cheap_embed", "random", "mergekit", "mergekit_hidden_avg",
                  "mergekit_cheap_embed", "mergekit_random"] | None = Field(
        None, description="expert rows from prompts' hidden states (last token / mean), token embeddings, or random "
                          "unit vectors; mergekit*: as mergekit-moe computes its gates; None keeps Gaussian rows of "
                          "std init_std")
    init_data: str | dict[str, str] | None = Field(
        None, description="texts per expert for `init`: a folder of <expert>.txt|.jsonl, or {expert: file}")


@ROUTERS.register("learned")
class LearnedRouter(Router):
    Options = LearnedOptions
    supports_null = True

    def __init__(self, **kw):
        super().__init__(**kw)
        n_rows = len(self.expert_names) + self.null_experts + int(self.always_on_base)
        self.weight = nn.Parameter(torch.randn(n_rows, self.d_in) * self.options.init_std)  # [E+N(+1), d]

    def forward(self, inp: RouteInput) -> Routing:
        h, allowed = inp.h, inp.allowed  # [T, d_in], [E]
        h = h.float()
        if self.training and self.options.jitter:
            h = h * torch.empty_like(h).uniform_(1 - self.options.jitter, 1 + self.options.jitter)
        logits = h @ self.weight.float().T  # [T, E+N(+1)]
        if self.training and self.options.noise:
            logits = logits + torch.randn_like(logits) * self.options.noise
        n = len(self.expert_names)
        routing = topk_routing(logits, k=self.top_k, n_experts=n, allowed=None if inp.every_allowed else allowed,
                               always_on_base=self.always_on_base)
        if self.training and n:
            routing.aux["balance"] = balance_loss(logits, routing.indices, n, self.null_experts)
            routing.aux["z"] = z_loss(logits)
        return routing

    @torch.no_grad()
    def set_expert_rows(self, rows: torch.Tensor) -> None:
        """Replace the experts' rows (rows: [E, d_in]); null and base rows are kept."""
        self.weight[: len(self.expert_names)] = rows.to(self.weight)

    def add_expert(self, name: str) -> None:
        n = len(self.expert_names)
        row = torch.randn(1, self.d_in, device=self.weight.device) * self.options.init_std
        self.weight = nn.Parameter(torch.cat([self.weight.data[:n], row, self.weight.data[n:]]))
        super().add_expert(name)

    def remove_expert(self, name: str) -> None:
        i = self.expert_names.index(name)
        self.weight = nn.Parameter(torch.cat([self.weight.data[:i], self.weight.data[i + 1:]]))
        super().remove_expert(name)
