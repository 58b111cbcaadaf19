"""Per-call routing state of one zoo, kept in context variables so that each thread (and each asyncio task) sees
only its own: the steering a caller set (forced / disabled experts, gates, a trace) and what the current forward
decides and accumulates (padding mask, running sequence means carried across decode steps, the global decision,
aux losses). The zoo holds only modules and configuration.

A forward traced by `torch.compile` cannot read context variables: it reads the steering most recently set by any
caller and keeps its call state in one slot shared by all callers. Compiled calls are therefore not isolated from
each other (run one compiled caller per zoo, or eager calls from many threads)."""
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

    attention_mask: torch.Tensor | None = None  # [B, past + S] as the forward got it
    new_tokens: int = 0  # S
    step: int = 0  # forwards begun so far in this context (traces tell decode steps apart by it)
    aux: list[dict[str, torch.Tensor]] = field(default_factory=list)
    global_routing: Routing | None = None
    block_routing: dict[str, Routing] = field(default_factory=dict)  # block name -> its router's decision
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    carry: bool | torch.Tensor = False  # the sums continue a cached sequence (a bool tensor under a static cache)

    @property
    def mask(self) -> torch.Tensor | None:
        """[B,S] of the forward's new tokens (sliced where it is read: the call's start does no tensor work)."""
        mask = self.attention_mask
        return None if mask is None else mask[:, -self.new_tokens:]


class _Slot:
    """The steering and call state compiled forwards share (they cannot read context variables)."""

    def __init__(self) -> None:
        self.steering = Steering()
        self.call: Call | None = None


class RoutingContext:
    """The routing state of one zoo's calls: one pair of context variables per zoo, read through properties."""

    def __init__(self, global_router: torch.nn.Module | None = None) -> None:
        self.global_router = global_router  # the one router of `scope: global` (a module of the zoo)
        self._steering: ContextVar[Steering] = ContextVar("zoo_steering", default=Steering())
        self._call: ContextVar[Call | None] = ContextVar("zoo_call", default=None)
        self._compiled = _Slot()  # what a compiled forward reads instead (see the module's docstring)

    def __getstate__(self) -> dict[str, Any]:  # a copied or pickled zoo starts with no steering and no call
        return {"global_router": self.global_router}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["global_router"])

    # ------------------------------------------------------------------ steering (set by the caller)
    @property
    def steering(self) -> Steering:
        if torch.compiler.is_compiling():
            return self._compiled.steering
        return self._steering.get()

    def steer(self, **changes: Any) -> Token:
        """Change the steering in the current context; `restore(token)` puts back what it was."""
        steering = dataclasses.replace(self._steering.get(), **changes)
        self._compiled.steering = steering
        return self._steering.set(steering)

    def restore(self, token: Token) -> None:
        self._steering.reset(token)
        self._compiled.steering = self._steering.get()

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
    def begin(self, attention_mask: torch.Tensor | None, past_len: int | torch.Tensor | None, seq_len: int) -> None:
        """Called before every forward of the wrapped model: a fresh Call, whose running sums continue the previous
        call's while a KV cache holds `past_len` > 0 tokens (an int, a 0-dim tensor under a static cache, or None
        when no router reads running sums)."""
        compiling = torch.compiler.is_compiling()
        prev = self._compiled.call if compiling else self._call.get()
        carry = False if past_len is None or prev is None else past_len > 0
        sums = prev.sums if prev is not None and carry is not False else {}
        # compiled calls are not counted (a counter read while tracing would recompile the forward at every step)
        step = 0 if compiling else (prev.step if prev is not None else 0) + 1
        call = Call(attention_mask=attention_mask, new_tokens=seq_len, step=step, sums=sums, carry=carry)
        self._compiled.call = call  # compiled decode steps continue from the last call, an eager prefill's included
        if not compiling:
            self._call.set(call)

    @property
    def call(self) -> Call:
        """The current forward's state (a layer run outside a zoo forward gets one of its own)."""
        if torch.compiler.is_compiling():
            if self._compiled.call is None:
                self._compiled.call = Call()
            return self._compiled.call
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
        mask = call.mask
        m = torch.ones(batch, seq, device=h.device) if mask is None or mask.shape != (batch, seq) \
            else mask.to(h.device).float()
        h = h.float() * m.unsqueeze(-1)
        prev_sum, prev_n = call.sums.get(key, (h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)))
        if prev_sum.shape[0] != batch:
            prev_sum, prev_n = h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)
        elif isinstance(call.carry, torch.Tensor):  # a static cache: whether it held tokens is known on the device
            prev_sum, prev_n = prev_sum * call.carry, prev_n * call.carry
        sums = prev_sum.unsqueeze(1) + h.cumsum(1)  # [B,S,d]
        counts = prev_n.unsqueeze(1) + m.cumsum(1)  # [B,S]
        call.sums[key] = (sums[:, -1].detach(), counts[:, -1].detach())
        return sums / counts.clamp(min=1.0).unsqueeze(-1)
