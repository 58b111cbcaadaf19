"""Dispatch: group (token, slot) pairs by expert in one pass, run each selected expert once on its slice,
and scatter-add the weighted outputs back. Pure tensor functions; null slots never reach an expert."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .routing import BASE, Routing


def base_coefficient(routing: Routing, residual: torch.Tensor, site_residual: bool) -> torch.Tensor:
    """Weight of base(x) per token [T]: the weights of residual experts and of the BASE slot; 1 for a token
    whose slots are all null at a residual site (it keeps the base)."""
    idx, w = routing.indices, routing.weights  # [T,k]
    is_res = residual[idx.clamp(min=0)] & (idx >= 0) if residual.numel() else torch.zeros_like(idx, dtype=torch.bool)
    coef = (w * (is_res | (idx == BASE))).sum(-1)  # [T]
    if site_residual:
        coef = torch.where((idx < 0).all(-1) & (idx != BASE).all(-1), torch.ones_like(coef), coef)
    return coef


def combine(
    x: torch.Tensor,
    routing: Routing,
    experts: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    base: torch.Tensor | None,
    base_coef: torch.Tensor | None,
    d_out: int,
) -> torch.Tensor:
    """y = coef * base(x) + sum over slots of w * expert(x).  x: [T,d_in], base: [T,d_out] | None -> [T,d_out]."""
    n_tokens, k = routing.indices.shape
    out = x.new_zeros(n_tokens, d_out) if base is None else base * base_coef.to(base.dtype).unsqueeze(-1)
    flat_idx = routing.indices.reshape(-1)  # [T*k]
    keep = flat_idx >= 0
    if not experts or k == 0:
        return out
    tokens = torch.arange(n_tokens, device=x.device).repeat_interleave(k)[keep]  # [S]
    weights = routing.weights.reshape(-1)[keep]  # [S]
    chosen = flat_idx[keep]  # [S]
    order = torch.argsort(chosen, stable=True)
    tokens, weights = tokens[order], weights[order]
    counts = torch.bincount(chosen, minlength=len(experts)).tolist()  # one host sync for all experts
    start = 0
    for expert, n in zip(experts, counts):
        if n:
            rows = tokens[start:start + n]  # [n]
            y = expert(x[rows]) * weights[start:start + n, None].to(x.dtype)  # [n, d_out]
            out = out.index_add(0, rows, y)
            start += n
    return out
