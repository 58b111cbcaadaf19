"""The Router contract: forward(RouteInput(h [T,d] float32, allowed [E] bool, seq_mask [B,S])) -> Routing; experts
can be added and removed."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..errors import ZooError
from ..registry import ROUTERS
from ..nn.routing import RouteInput, Routing

if TYPE_CHECKING:
    from ..config import ExpertSpec


__all__ = ["ROUTERS", "NoOptions", "Router"]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Router(nn.Module):
    """Decides, per token, which experts of a site run and with which weights.

    `batch_invariant` is True when one token's decision never depends on other tokens of the batch.
    `fit_from` says how a router built from data is fitted, one expert at a time (`expertzoo.fit`):
    "activations" (`fit(name, activations)`), "weights" (from the expert's own weights), "gates" (a gate per
    expert trained on its data); None for routers trained by gradient or not trained at all.
    `RouteInput.seq_mask` [B,S] (real tokens of the forward) serves routers whose decisions span a sequence
    (expert choice); token-choice routers ignore it.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    supports_null: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = True
    supports_always_on_base: ClassVar[bool] = True
    fit_from: ClassVar[Literal["activations", "weights", "gates"] | None] = None

    def __init__(self, *, d_in: int, experts: list[str], top_k: int, null_experts: int,
                 always_on_base: bool, options: dict[str, Any]):
        super().__init__()
        self.d_in = d_in
        self.expert_names = list(experts)
        self.top_k, self.null_experts, self.always_on_base = top_k, null_experts, always_on_base
        self.options = self.Options(**options)

    def forward(self, inp: RouteInput) -> Routing:
        raise NotImplementedError

    def add_expert(self, name: str) -> None:
        self.expert_names.append(name)

    def fit(self, expert_name: str, activations: torch.Tensor) -> None:
        """Fit expert `expert_name`'s part from its own router inputs `activations` [N, d_in]; the rest is kept."""
        raise ZooError(f"router kind {self.kind!r} is not fitted from activations; use kind centroid or rnd")

    def flops_per_token(self) -> int:
        """Multiply-adds x2 to route one token (weights and buffers of rank >= 2, each used once)."""
        tensors = [*self.parameters(), *self.buffers()]
        return 2 * sum(t.numel() for t in tensors if t.dim() >= 2)

    @classmethod
    def check_experts(cls, experts: list["ExpertSpec"]) -> None:
        """Raise ValueError (one line: the expert and the fix) when this kind cannot route these experts."""

    def remove_expert(self, name: str) -> None:
        self.expert_names.remove(name)

