"""The Router contract: forward(h [T,d] float32, allowed [E] bool) -> Routing; experts can be added and removed."""
from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..registry import Registry
from ..routing import Routing


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Router(nn.Module):
    """Decides, per token, which experts of a site run and with which weights.

    `batch_invariant` is True when one token's decision never depends on other tokens of the batch.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    supports_null: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = True

    def __init__(self, *, d_in: int, experts: list[str], top_k: int, null_experts: int,
                 always_on_base: bool, options: dict[str, Any]):
        super().__init__()
        self.d_in = d_in
        self.expert_names = list(experts)
        self.top_k, self.null_experts, self.always_on_base = top_k, null_experts, always_on_base
        self.options = self.Options(**options)

    def forward(self, h: torch.Tensor, allowed: torch.Tensor) -> Routing:  # h: [T, d_in]
        raise NotImplementedError

    def add_expert(self, name: str) -> None:
        self.expert_names.append(name)

    def remove_expert(self, name: str) -> None:
        self.expert_names.remove(name)


ROUTERS: Registry[Router] = Registry("router")
