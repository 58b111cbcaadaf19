"""Dispatch: group (token, slot) pairs by expert in one pass, run each selected expert once on its slice,
and scatter-add the weighted outputs back. Pure tensor functions; null slots never reach an expert."""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .errors import ZooError
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


def merged_lora(x: torch.Tensor, routing: Routing, experts: Mapping[str, torch.nn.Module], d_out: int) -> torch.Tensor:
    """SMEAR's merged expert, per token: A_t = sum_i w_ti A_i, B_t = sum_i w_ti s_i B_i, delta = B_t A_t x.

    x: [T,d_in] -> delta [T,d_out]. Factorised (two matmuls over the stacked experts, no [T,d_out,r] tensor);
    the experts must be LoRA experts of one rank.
    """
    from .experts.lora import LoraExpert

    mods = list(experts.values())
    for name, e in experts.items():
        if not isinstance(e, LoraExpert) or e.lora_A.shape != mods[0].lora_A.shape:
            what = f"rank {e.lora_A.shape[0]}" if isinstance(e, LoraExpert) else f"kind {e.kind!r}"
            raise ZooError(f"router kind 'smear' merges LoRA experts of one rank, but expert {name!r} has {what}; "
                           "use lora experts of one rank, or another router kind")
    n_tokens = x.shape[0]
    if not mods:
        return x.new_zeros(n_tokens, d_out)
    rank = mods[0].lora_A.shape[0]
    dense = torch.zeros(n_tokens, len(mods), device=x.device)  # [T,E] weight per expert
    dense.scatter_add_(1, routing.indices.clamp(min=0), routing.weights * (routing.indices >= 0))
    dense = dense.to(x.dtype)
    a = torch.cat([e.lora_A for e in mods])  # [E*r, d_in]
    b = torch.cat([e.lora_B * e.scale for e in mods], dim=1)  # [d_out, E*r]
    h = (x @ a.T).view(n_tokens, len(mods), rank)  # [T,E,r]: every expert's A x
    h = (h * dense.unsqueeze(-1)).sum(1)  # [T,r]: the merged A_t x
    z = (dense.unsqueeze(-1) * h.unsqueeze(1)).reshape(n_tokens, -1)  # [T,E*r]: w_ti * (A_t x)
    return z @ b.T  # [T,d_out]: the merged B_t (A_t x)
