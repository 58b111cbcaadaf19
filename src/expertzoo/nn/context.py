"""Per-call routing state of one zoo, kept in context variables so that each thread (and each asyncio task) sees
only its own: the steering a caller set (forced / disabled experts, gates, a trace) and what the current forward
decides and accumulates (padding mask, running sequence means carried across decode steps, the global decision,
aux losses). The zoo holds only modules and configuration."""
from __future__ import annotations

import dataclasses
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from .routing import Routing


@dataclass
class Trace:
    """Routing decisions recorded per site while tracing: lists of {site, indices, weights, mask}."""

    records: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Steering:
    """What a caller asked of the routing, until it asks otherwise: immutable, so a copied context shares nothing.

    `forced`: every token to these experts (equal weight; () = the base alone; None = the router decides).
    `gates`: site name -> gate(x [B,S,d]) -> [T] in (0,1), scaling a forced expert (PHATGOOSE gate training).
    """

    forced: tuple[str, ...] | None = None
    disabled: frozenset[str] = frozenset()
    gates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None
    trace: Trace | None = None


@dataclass
class Call:
    """What one forward of the wrapped model decides and accumulates; `sums` carry over to its decode steps."""

    mask: torch.Tensor | None = None  # [B,S] of the forward's new tokens
    step: int = 0  # forwards begun so far in this context (traces tell decode steps apart by it)
    aux: list[dict[str, torch.Tensor]] = field(default_factory=list)
    global_routing: Routing | None = None
    block_routing: dict[str, Routing] = field(default_factory=dict)  # block name -> its router's decision
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


class RoutingContext:
    """The routing state of one zoo's calls: one pair of context variables per zoo, read through properties."""

    def __init__(self, global_router: torch.nn.Module | None = None) -> None:
        self.global_router = global_router  # the one router of `scope: global` (a module of the zoo)
        self._steering: ContextVar[Steering] = ContextVar("zoo_steering", default=Steering())
        self._call: ContextVar[Call | None] = ContextVar("zoo_call", default=None)

    def __getstate__(self) -> dict[str, Any]:  # a copied or pickled zoo starts with no steering and no call
        return {"global_router": self.global_router}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["global_router"])

    # ------------------------------------------------------------------ steering (set by the caller)
    @property
    def steering(self) -> Steering:
        return self._steering.get()

    def steer(self, **changes: Any) -> Token:
        """Change the steering in the current context; `restore(token)` puts back what it was."""
        return self._steering.set(dataclasses.replace(self._steering.get(), **changes))

    def restore(self, token: Token) -> None:
        self._steering.reset(token)

    @property
    def forced(self) -> list[str] | None:
        forced = self.steering.forced
        return None if forced is None else list(forced)

    @property
    def disabled(self) -> frozenset[str]:
        return self.steering.disabled

    @property
    def gates(self) -> Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None:
        return self.steering.gates

    @gates.setter
    def gates(self, gates: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None) -> None:
        self.steer(gates=gates)

    @property
    def trace(self) -> Trace | None:
        return self.steering.trace

    # ------------------------------------------------------------------ the current forward
    def begin(self, attention_mask: torch.Tensor | None, past_len: int, seq_len: int) -> None:
        """Called before every forward of the wrapped model: a fresh Call (running sums kept while a KV cache is)."""
        prev = self._call.get()
        sums = prev.sums if prev is not None and past_len > 0 else {}
        mask = None if attention_mask is None else attention_mask[:, -seq_len:]
        self._call.set(Call(mask=mask, step=(prev.step if prev is not None else 0) + 1, sums=sums))

    @property
    def call(self) -> Call:
        """The current forward's state (a layer run outside a zoo forward gets one of its own)."""
        call = self._call.get()
        if call is None:
            call = Call()
            self._call.set(call)
        return call

    @property
    def step(self) -> int:
        return self.call.step

    @property
    def aux(self) -> list[dict[str, torch.Tensor]]:
        return self.call.aux

    def batch_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Real (non-pad) tokens of the current forward, shaped like x's tokens: x [B,S,d] -> [B,S] bool."""
        shape = tuple(x.shape[:-1]) if x.dim() >= 3 else (1, x.shape[0])
        mask = self.call.mask
        if mask is not None and tuple(mask.shape) == shape:
            return mask.to(x.device).bool()
        return torch.ones(shape, dtype=torch.bool, device=x.device)

    def running_mean(self, key: str, h: torch.Tensor) -> torch.Tensor:
        """Causal mean over each sequence's prefix, pads excluded, carried across cached decode steps.

        h: [B,S,d] -> [B,S,d]
        """
        call = self.call
        batch, seq, _ = h.shape
        m = torch.ones(batch, seq, device=h.device) if call.mask is None or call.mask.shape != (batch, seq) \
            else call.mask.to(h.device).float()
        h = h.float() * m.unsqueeze(-1)
        prev_sum, prev_n = call.sums.get(key, (h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)))
        if prev_sum.shape[0] != batch:
            prev_sum, prev_n = h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)
        sums = prev_sum.unsqueeze(1) + h.cumsum(1)  # [B,S,d]
        counts = prev_n.unsqueeze(1) + m.cumsum(1)  # [B,S]
        call.sums[key] = (sums[:, -1].detach(), counts[:, -1].detach())
        return sums / counts.clamp(min=1.0).unsqueeze(-1)
