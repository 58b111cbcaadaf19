"""Routing decisions and the helpers every router shares: top-k selection, fixed weights, balancing losses.

Index conventions in `Routing.indices`: 0..E-1 are experts of the site, NULL (-1) an empty slot that costs
nothing, BASE (-2) the site's original module taken as one more expert (always-on base, `fixed: []`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

NULL = -1
BASE = -2


@dataclass
class Routing:
    """weights [T,k] float32 (normalised over non-null slots), indices [T,k] long, logits [T,C] | None.

    `merge`: set by a router that merges the selected experts instead of dispatching to each (SMEAR):
    merge(x [T,d_in], routing, experts {name: module}, d_out) -> the experts' part of y [T,d_out].
    `may_use_base`: False when no slot can be BASE (known without reading `indices`): a site of replace experts
    then skips base(x) without asking the device. `normalised`: every slot holds an expert (no NULL, no BASE) and
    each token's weights sum to 1, so a site of residual experts keeps base(x) whole without computing c(x).
    Slot counts k never depend on routing values (no host sync):
    a slot that cannot be filled (a disabled expert) is NULL with weight 0.
    """

    weights: torch.Tensor
    indices: torch.Tensor
    logits: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)
    merge: Callable[[torch.Tensor, "Routing", Mapping[str, torch.nn.Module], int], torch.Tensor] | None = None
    may_use_base: bool = True
    normalised: bool = False  # known on the host: every slot is an expert and each token's weights sum to 1


@dataclass(frozen=True)
class RouteInput:
    """What a router reads at one site: h [T, d_in] float32 (each token, or the running mean of its sequence's
    prefix), allowed [E] bool (experts not disabled), seq_mask [B,S] bool with B*S = T (real tokens; None: one
    sequence of real tokens)."""

    h: torch.Tensor
    allowed: torch.Tensor
    seq_mask: torch.Tensor | None = None
    every_allowed: bool = False  # known on the host: no expert is disabled (routers may skip masking)

    def sequences(self) -> torch.Tensor:
        """seq_mask as [B,S] bool on h's device; one sequence of real tokens when it does not fit h."""
        mask = self.seq_mask
        if mask is None or mask.numel() != self.h.shape[0]:
            return torch.ones(1, self.h.shape[0], dtype=torch.bool, device=self.h.device)
        return mask.to(self.h.device).bool()


def fixed_routing(n_tokens: int, indices: list[int], device: torch.device) -> Routing:
    """Every token to the same slots with equal weight; `[]` means the base alone."""
    indices = indices or [BASE]
    idx = torch.tensor(indices, dtype=torch.long, device=device).expand(n_tokens, -1)  # [T,k]
    w = torch.full((n_tokens, len(indices)), 1.0 / len(indices), device=device)  # [T,k]
    return Routing(weights=w, indices=idx, may_use_base=BASE in indices)


def topk_routing(
    logits: torch.Tensor,
    *,
    k: int,
    n_experts: int,
    allowed: torch.Tensor | None,
    always_on_base: bool = False,
) -> Routing:
    """Top-k over `logits` [T, E + N (+1 base)] in float32.

    Columns 0..E-1 are experts, the next N null slots, and with `always_on_base` the last column is the
    base's own logit. Weights are a softmax over the selected non-null logits (plus the base's); null
    slots get weight 0 and index NULL. Disallowed experts (disabled) are never chosen: k stays min(k, E + N)
    whatever `allowed` holds, a slot left without an allowed expert being NULL (no host sync). `allowed=None`:
    every expert allowed.
    """
    logits = logits.float()
    n_tokens, n_cols = logits.shape
    if allowed is None and n_cols == n_experts and 0 < k <= n_cols:
        top, idx = logits.topk(k, dim=-1)  # every expert allowed, no null slot: nothing to mask (decode's path)
        return Routing(weights=torch.softmax(top, dim=-1), indices=idx, logits=logits, may_use_base=False,
                       normalised=True)
    if allowed is None:
        allowed = torch.ones(n_experts, dtype=torch.bool, device=logits.device)
    routed = logits[:, : n_cols - int(always_on_base)]  # [T, E+N]
    mask = torch.ones(routed.shape[1], dtype=torch.bool, device=logits.device)
    mask[:n_experts] = allowed
    masked = routed.masked_fill(~mask, float("-inf"))
    k = min(k, routed.shape[1])
    top, idx = masked.topk(k, dim=-1) if k else (masked[:, :0], masked[:, :0].long())  # [T,k]
    is_null = (idx >= n_experts) | (top == float("-inf"))
    top = top.masked_fill(is_null, float("-inf"))
    idx = idx.masked_fill(is_null, NULL)
    if always_on_base:
        top = torch.cat([top, logits[:, -1:]], dim=-1)  # [T,k+1]
        idx = torch.cat([idx, torch.full_like(idx[:, :1], BASE)], dim=-1)
    weights = torch.softmax(top, dim=-1).nan_to_num(0.0)  # all-null rows: softmax of -inf is nan -> 0
    return Routing(weights=weights, indices=idx, logits=logits, may_use_base=always_on_base)


def _summed_over_ranks(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """(the tensors summed over the processes of a multi-process training step, the number of processes); the
    tensors themselves and 1 in a single process or outside a gradient step (evaluation never synchronises)."""
    if not (dist.is_available() and dist.is_initialized() and torch.is_grad_enabled()):
        return list(tensors), 1
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    return list(flat.split([t.numel() for t in tensors])), dist.get_world_size()


def balance_loss(logits: torch.Tensor, indices: torch.Tensor, n_experts: int, n_null: int = 0) -> torch.Tensor:
    """Switch load-balancing loss E * sum_i f_i P_i; null slots count as one averaged group (AdaMoE).

    logits: [T, E+N(+1)], indices: [T,k]. Under several processes f and the token count are summed over the
    ranks, and each rank returns (world size) x its tokens' part of the global P, so the gradient mean that DDP
    takes equals the gradient of the loss of the whole global batch (one process gets the same loss).
    """
    probs = torch.softmax(logits[:, : n_experts + n_null].float(), dim=-1)  # [T, E+N]
    counts = F.one_hot(indices.clamp(min=0), n_experts + n_null).float()  # [T,k,E+N]
    counts = counts * (indices >= 0).unsqueeze(-1)
    (count, tokens), world = _summed_over_ranks(counts.sum((0, 1)), probs.new_tensor([float(len(probs))]))
    frac = count / count.sum().clamp(min=1.0)  # [E+N]
    p = probs.sum(0) * world / tokens.clamp(min=1.0)  # [E+N]
    if n_null:
        frac = torch.cat([frac[:n_experts], frac[n_experts:].mean(0, keepdim=True)])
        p = torch.cat([p[:n_experts], p[n_experts:].mean(0, keepdim=True)])
    return frac.numel() * (frac * p).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the router logits."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def uniform_routing(n_tokens: int, allowed: torch.Tensor, *, with_base: bool = False) -> Routing:
    """Every allowed expert (and the BASE slot `with_base`), equal weight: [T, E (+1)], disallowed experts NULL
    (none allowed: every slot NULL; the layer then gives the tokens the base alone, nn/layer.py)."""
    on = allowed.float()  # [E]
    idx = torch.arange(len(allowed), device=allowed.device).masked_fill(~allowed, NULL)  # [E]
    w = on / (on.sum() + float(with_base)).clamp(min=1.0)  # [E]
    if with_base:
        idx = torch.cat([idx, idx.new_tensor([BASE])])
        w = torch.cat([w, 1.0 - w.sum(0, keepdim=True)])
    return Routing(weights=w.expand(n_tokens, -1), indices=idx.expand(n_tokens, -1), may_use_base=with_base)


def base_alone(routing: Routing, rows: torch.Tensor) -> Routing:
    """Send the tokens where `rows` [T] is True to the base alone: first slot BASE with weight 1, the rest NULL."""
    if routing.indices.shape[1] == 0:
        return routing
    idx = torch.where(rows[:, None], torch.full_like(routing.indices, NULL), routing.indices)  # [T,k]
    idx[:, 0] = torch.where(rows, torch.full_like(idx[:, 0], BASE), idx[:, 0])
    w = torch.where(rows[:, None], torch.zeros_like(routing.weights), routing.weights)  # [T,k]
    w[:, 0] = torch.where(rows, torch.ones_like(w[:, 0]), w[:, 0])
    return Routing(weights=w, indices=idx, logits=routing.logits, aux=routing.aux, merge=routing.merge)


def normalise_selected(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Weights of the kept slots summing to 1 per row (0 where none is kept).  probs, keep: [T,k] -> [T,k].

    The normaliser is held constant for the gradient: the value is the normalised weight, the gradient that
    of the unnormalised probability (as in top-p and expert-choice routing, whose papers do not renormalise),
    so a token that kept one expert still teaches the router.
    """
    kept = probs * keep
    return kept / kept.sum(-1, keepdim=True).detach().clamp(min=1e-12)


def gated_routing(routing: Routing, gate: torch.Tensor) -> Routing:
    """Scale a forced single expert by gate(x) [T] in (0,1): slots [expert, BASE] with weights [g, 1 - g].

    A residual expert then adds g * delta(x) to base(x); a replace expert mixes g * E(x) + (1 - g) * base(x).
    Used to train PHATGOOSE gates; routings with other than one expert slot are returned unchanged.
    """
    if routing.indices.shape[1] != 1 or bool((routing.indices < 0).any()):
        return routing
    g = gate.float().reshape(-1, 1)  # [T,1]
    idx = torch.cat([routing.indices, torch.full_like(routing.indices, BASE)], dim=-1)  # [T,2]
    return Routing(weights=torch.cat([g, 1.0 - g], dim=-1), indices=idx)


def balance_anneal(step: int, steps: int, *, tight: float = 1.0, loose: float = 0.1) -> float:
    """Multiplier of the balance-loss weight at `step` of `steps`: geometric from `tight` down to `loose`.

    AdaMoE-style: hold experts (and null slots) to a balanced load early, then let the router concentrate
    tokens and use null slots freely. Pass it as `train.fit(..., balance_schedule=balance_anneal)`, or
    `functools.partial(balance_anneal, tight=2.0, loose=0.01)` for other end points.
    """
    frac = min(max(step / max(steps - 1, 1), 0.0), 1.0)
    return tight * math.exp(frac * math.log(loose / tight))
