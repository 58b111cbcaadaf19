"""The Router contract: forward(RouteInput(h [T,d] float32, allowed [E] bool, seq_mask [B,S])) -> Routing; experts
can be added and removed."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..registry import ROUTERS
from ..nn.routing import RouteInput, Routing

if TYPE_CHECKING:
    from ..config import ExpertSpec


__all__ = ["CAPABILITIES", "ROUTERS", "FitsFromActivations", "FitsFromGates", "FitsFromWeights", "InitialisedFromRows",
           "NoOptions", "Router"]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Router(nn.Module):
    """Decides, per token, which experts of a site run and with which weights.

    `batch_invariant` is True when one token's decision never depends on other tokens of the batch.
    `fit_from` says how a router built from data is fitted, one expert at a time (`training/fit.py`), and so
    which capability below the kind has: "activations" (FitsFromActivations), "weights" (FitsFromWeights),
    "gates" (FitsFromGates); None for routers trained by gradient or not trained at all.
    `RouteInput.seq_mask` [B,S] (real tokens of the forward) serves routers whose decisions span a sequence
    (expert choice); token-choice routers ignore it.
    """

    kind: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    supports_null: ClassVar[bool] = False
    batch_invariant: ClassVar[bool] = True
    supports_always_on_base: ClassVar[bool] = True
    fit_from: ClassVar[Literal["activations", "weights", "gates"] | None] = None
    # True: the router reads its choices back to the host (expert choice): a compiled forward breaks its graph there
    host_sync: ClassVar[bool] = False

    def __init__(self, *, d_in: int, experts: list[str], top_k: int, null_experts: int,
                 always_on_base: bool, options: BaseModel | dict[str, Any]):
        super().__init__()
        self.d_in = d_in
        self.expert_names = list(experts)
        self.top_k, self.null_experts, self.always_on_base = top_k, null_experts, always_on_base
        self.options = options if isinstance(options, self.Options) else self.Options(**options)

    def forward(self, inp: RouteInput) -> Routing:
        raise NotImplementedError

    def _apply(self, fn, recurse=True):
        """As nn.Module's (`.to`, `.cuda`, `.half` ...), but routing stays float32: a zoo cast to bfloat16 or
        float16 keeps its routers' floating parameters and buffers in float32 (the layer hands them float32
        inputs; only the experts and the base run in the zoo's dtype)."""
        out = super()._apply(fn, recurse)
        for t in [*self.parameters(), *self.buffers()]:
            if t.is_floating_point() and t.dtype != torch.float32:
                t.data = t.data.float()
        return out

    def add_expert(self, name: str) -> None:
        self.expert_names.append(name)

    def flops_per_token(self) -> int:
        """Multiply-adds x2 to route one token (weights and buffers of rank >= 2, each used once)."""
        tensors = [*self.parameters(), *self.buffers()]
        return 2 * sum(t.numel() for t in tensors if t.dim() >= 2)

    @classmethod
    def check_experts(cls, experts: list["ExpertSpec"]) -> None:
        """Raise ValueError (one line: the expert and the fix) when this kind cannot route these experts."""

    def remove_expert(self, name: str) -> None:
        self.expert_names.remove(name)

    def state_loaded(self) -> None:
        """Called after the router's buffers were written in place (a zoo's weights loaded): refresh what the
        router keeps on the host about them (routing reads no buffer back from the device)."""


# ---------------------------------------------------------------- what fitting and initialisation call on a router

@runtime_checkable
class FitsFromActivations(Protocol):
    """Fitted one expert at a time from that expert's router inputs (centroid, rnd)."""

    fit_pool: str  # which inputs `fit` wants: "mean" every real token, "last" each sequence's last one

    def fit(self, expert_name: str, activations: torch.Tensor) -> None:
        """Fit expert `expert_name`'s part from its own router inputs `activations` [N, d_in]; the rest is kept."""


@runtime_checkable
class FitsFromWeights(Protocol):
    """Fitted from each expert's own weights, no data (arrow)."""

    def fit_weights(self, expert_name: str, expert: nn.Module) -> None:
        """Fit expert `expert_name`'s part from the expert module at this router's site."""


@runtime_checkable
class FitsFromGates(Protocol):
    """Fitted from a gate vector per expert and site, trained on that expert's data (phatgoose)."""

    def expert_seed(self, expert_name: str) -> int:
        """A seed that depends on the expert's name only (its gate training is reproducible alone)."""

    def set_gate(self, expert_name: str, gate: torch.Tensor) -> None:
        """Take expert `expert_name`'s trained gate [d_in]."""


@runtime_checkable
class InitialisedFromRows(Protocol):
    """Routers whose expert rows can be set without training (router `init`, build/router_init.py)."""

    def set_expert_rows(self, rows: torch.Tensor) -> None:
        """Set every expert's row: rows [E, d_in]."""


CAPABILITIES: dict[str, type] = {"activations": FitsFromActivations, "weights": FitsFromWeights,
                                 "gates": FitsFromGates}  # Router.fit_from -> what the kind must offer
