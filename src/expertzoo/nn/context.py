"""Per-forward routing state of one zoo: padding mask, running sequence means, a shared global decision,
forced/disabled experts, traces and the aux losses of the last forward. No global state: one per zoo."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Trace:
    """Routing decisions recorded per site while tracing: lists of {site, indices, weights, mask}."""

    records: list[dict[str, Any]] = field(default_factory=list)


class RoutingContext:
    def __init__(self) -> None:
        self.forced: list[str] | None = None
        self.disabled: set[str] = set()
        self.trace: Trace | None = None
        self.aux: list[dict[str, torch.Tensor]] = []
        self.global_routing = None
        self.mask: torch.Tensor | None = None  # [B,S] of the current forward's new tokens
        self.step = 0  # forwards begun so far (traces use it to tell decode steps apart)
        self._sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # site name -> gate(x [B,S,d]) -> [T] in (0,1), scaling a forced expert (PHATGOOSE gate training)
        self.gates: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None

    def begin(self, attention_mask: torch.Tensor | None, past_len: int, seq_len: int) -> None:
        """Called before every forward of the wrapped model."""
        if past_len == 0:
            self._sums = {}
        self.mask = None if attention_mask is None else attention_mask[:, -seq_len:]
        self.global_routing = None
        self.aux = []
        self.step += 1

    def batch_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Real (non-pad) tokens of the current forward, shaped like x's tokens: x [B,S,d] -> [B,S] bool."""
        shape = tuple(x.shape[:-1]) if x.dim() >= 3 else (1, x.shape[0])
        if self.mask is not None and tuple(self.mask.shape) == shape:
            return self.mask.to(x.device).bool()
        return torch.ones(shape, dtype=torch.bool, device=x.device)

    def running_mean(self, key: str, h: torch.Tensor) -> torch.Tensor:
        """Causal mean over each sequence's prefix, pads excluded, carried across cached decode steps.

        h: [B,S,d] -> [B,S,d]
        """
        batch, seq, _ = h.shape
        m = torch.ones(batch, seq, device=h.device) if self.mask is None or self.mask.shape != (batch, seq) \
            else self.mask.to(h.device).float()
        h = h.float() * m.unsqueeze(-1)
        prev_sum, prev_n = self._sums.get(key, (h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)))
        if prev_sum.shape[0] != batch:
            prev_sum, prev_n = h.new_zeros(batch, h.shape[-1]), h.new_zeros(batch)
        sums = prev_sum.unsqueeze(1) + h.cumsum(1)  # [B,S,d]
        counts = prev_n.unsqueeze(1) + m.cumsum(1)  # [B,S]
        self._sums[key] = (sums[:, -1].detach(), counts[:, -1].detach())
        return sums / counts.clamp(min=1.0).unsqueeze(-1)
