"""Dispatch: mix a site's base and its routed experts, y = c(x)·base(x) + Σ_slots w·E(x). `mix` sorts the (token,
slot) pairs by expert once (one host sync for all experts), runs each selected expert once on its slice, never
touches null slots, and runs same-shape LoRA experts together; `mix_reference` is the plain path it must equal."""
from __future__ import annotations

from itertools import accumulate
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..errors import ZooError
from .routing import BASE, NULL, Routing

# Strategies, chosen per call by what bench/strategies.py and bench/layer.py measured (docs/results/):
# same-shape LoRA experts run gathered per slot (two batched matmuls, no sort, no host sync) for few (token, slot)
# pairs, densely (every adapter on every token: two plain matmuls, no sync) while the work spent on unselected
# adapters stays small, else one slice of tokens per adapter (one sort, one host sync). On a GPU kernel launches
# and syncs cost more than flops: gathered up to LORA_GATHER_MAX_SLOTS_CUDA pairs, dense beyond.
LORA_GATHER_MAX_SLOTS = 4  # ... or up to E // 4 pairs: gathering costs per pair, the others grow with E
LORA_DENSE_MAX_WASTE = 150e6  # multiply-adds on unselected adapters: T * (E - k) * r * (d_in + d_out)
LORA_GATHER_MAX_SLOTS_CUDA = 1024
# Same-shape SwiGLU FFN experts on a GPU run as one padded batch [E, C, d] (C = the busiest expert's load): a fixed
# number of kernels whatever E, when there are at least as many slots as experts and the padding stays within this
# many times the real rows (+ 512); else one slice per expert.
FFN_PADDED_DEVICES = ("cuda",)
FFN_PADDED_MAX_PADDING = 2


# ---------------------------------------------------------------------------- the reference path

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


def mix_reference(x: torch.Tensor, routing: Routing, experts: Mapping[str, nn.Module],
                  base_fn: Callable[[], torch.Tensor], d_out: int) -> torch.Tensor:
    """The plain path: x [T,d_in] -> [T,d_out]; `base_fn()` is base(x), called only when some token needs it."""
    mods = list(experts.values())
    residual = torch.tensor([e.mode == "residual" for e in mods], dtype=torch.bool, device=x.device)
    # no slot at all (every expert disabled) keeps the base, as at a residual site
    site_residual = not mods or bool(residual.any()) or routing.indices.shape[1] == 0
    needs_base = site_residual or bool((routing.indices == BASE).any())
    base = base_fn() if needs_base else None  # [T, d_out]
    coef = base_coefficient(routing, residual, site_residual) if needs_base else None
    if routing.merge:  # SMEAR: one merged LoRA per token instead of dispatching
        return base * coef.to(base.dtype).unsqueeze(-1) + merged_lora(x, routing, experts, d_out)
    return combine(x, routing, mods, base, coef, d_out)


# ---------------------------------------------------------------------------- the fast path

class Plan:
    """What `mix` derives once from a site's experts (a layer keeps it until its experts change): which experts
    are residual, which run batched (same-shape LoRA groups; SwiGLU FFN experts, when they are all the site's),
    and the stacked weights (views of the experts' own weights, checked by address on every use)."""

    def __init__(self, experts: list[nn.Module]):
        self.experts = experts
        self.residual = [e.mode == "residual" for e in experts]
        self.groups = [g for g in _lora_groups(experts) if len(g) > 1]
        batched = {i for g in self.groups for i in g}
        self.singles = [i for i in range(len(experts)) if i not in batched]
        self.ffn_batch = len(experts) > 1 and _same_swiglu(experts)
        self._banks: dict[int, tuple] = {}

    def fits(self, experts: list[nn.Module]) -> bool:
        return len(experts) == len(self.experts) and all(a is b for a, b in zip(experts, self.experts))

    def bank(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """(A [E,r,d_in], B^T [E,r,d_out], scale) of LoRA group g; see `lora_bank`."""
        members = [self.experts[i] for i in self.groups[g]]
        params = [e._parameters[n] for e in members for n in ("lora_A", "lora_B")]
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return lora_bank(members)  # differentiable copies
        cached = self._banks.get(g)
        if cached is None or cached[0] != [p.data_ptr() for p in params]:
            a, b, _ = lora_bank(members)
            cached = self._banks[g] = ([p.data_ptr() for p in params], a, b)
        return cached[1], cached[2], _scales(members, cached[1])

    def ffn_bank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate|up [E,d_in,2F], down [E,F,d_out]) of the site's SwiGLU FFN experts; see `ffn_bank`."""
        params = [p for e in self.experts for p in (e.module.gate_proj.weight, e.module.up_proj.weight,
                                                     e.module.down_proj.weight)]
        cached = self._banks.get("ffn")
        if cached is None or cached[0] != [p.data_ptr() for p in params]:
            gate_up, down = ffn_bank(self.experts)
            cached = self._banks["ffn"] = ([p.data_ptr() for p in params], gate_up, down)
        return cached[1], cached[2]


def mix(x: torch.Tensor, routing: Routing, experts: Mapping[str, nn.Module], base_fn: Callable[[], torch.Tensor],
        d_out: int, *, plans: dict[str, Plan] | None = None) -> torch.Tensor:
    """y = c(x)·base(x) + Σ_slots w·E(x) for x [T,d_in] -> [T,d_out]; equals `mix_reference` up to rounding.

    `plans`: a dict the caller keeps between calls (a ZooLayer keeps one) so the plan is made once."""
    mods = list(experts.values())
    plan = plans.get("plan") if plans is not None else None
    if plan is None or not plan.fits(mods):
        plan = Plan(mods)
        if plans is not None:
            plans["plan"] = plan
    idx, w = routing.indices, routing.weights  # [T,k]
    site_residual = not mods or any(plan.residual) or idx.shape[1] == 0
    slots = None if site_residual else sorted_slots(idx, len(mods))  # its counts say whether BASE slots exist
    if site_residual or slots[2][0]:
        base = base_fn()  # [T, d_out]
        out = base * _cast(_base_weight(idx, w, plan.residual, site_residual), base.dtype).unsqueeze(-1)
    else:
        out = x.new_zeros(x.shape[0], d_out)
    if routing.merge:  # SMEAR: one merged LoRA per token instead of dispatching
        return out + merged_lora(x, routing, experts, d_out)
    if not mods or idx.shape[1] == 0:
        return out
    for g, group in enumerate(plan.groups):
        out = _add_lora_group(out, x, idx, w, plan.bank(g), group, len(mods))
    if not plan.singles:
        return out
    slots = slots or sorted_slots(idx, len(mods))
    if plan.ffn_batch and x.device.type in FFN_PADDED_DEVICES and not torch.is_grad_enabled():
        done = _add_ffn_padded(out, x, w, slots, plan)
        if done is not None:
            return done
    return _add_slices(out, x, w, slots, mods, plan.singles)


def _base_weight(idx: torch.Tensor, w: torch.Tensor, residual: list[bool], site_residual: bool) -> torch.Tensor:
    """c(x) [T]: the weight of residual experts' slots and of the BASE slot; 1 where every slot is null at a
    residual site. idx, w: [T,k]."""
    if all(residual):  # every expert residual: every slot but a null one weighs base(x)
        taken = idx != NULL
    else:
        is_res = torch.tensor(residual, dtype=torch.bool, device=idx.device)[idx.clamp(min=0)]  # [T,k]
        taken = (is_res & (idx >= 0)) | (idx == BASE)
    coef = (w * taken).sum(-1)  # [T]
    if site_residual:
        coef = coef.masked_fill((idx == NULL).all(-1), 1.0)
    return coef


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def sorted_slots(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The (token, slot) pairs of idx [T,k] sorted by index, BASE then NULL then expert 0, 1, ...: (order [T*k],
    counts [E+2] on the device, the same counts on the host). The one host sync for all experts."""
    flat = idx.reshape(-1)  # [T*k]
    counts = torch.bincount(flat + 2, minlength=n_experts + 2)  # [E+2]
    return torch.argsort(flat, stable=True), counts, counts.tolist()


def _add_slices(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, slots: tuple, experts: Sequence[nn.Module],
                wanted: list[int]) -> torch.Tensor:
    """out [T,d_out] + the slots of experts `wanted`, each expert run once on its slice of tokens."""
    order, _, counts = slots
    k = w.shape[1]
    order = order[counts[0] + counts[1]:]  # [S] expert slots, grouped by expert
    tokens, weights = order // k, _cast(w.reshape(-1)[order], x.dtype)  # [S], [S]
    starts = list(accumulate(counts[2:], initial=0))
    grad = torch.is_grad_enabled()  # an expert's output may be needed by its own backward: no in-place then
    for i in wanted:
        lo, hi = starts[i], starts[i + 1]
        if hi > lo:
            rows = tokens[lo:hi]  # [n]
            y = experts[i](x[rows])  # [n, d_out]
            y = y * weights[lo:hi, None] if grad else y.mul_(weights[lo:hi, None])
            out = out.index_add_(0, rows, y)
    return out


# ---------------------------------------------------------------------------- same-shape SwiGLU FFN experts

def _same_swiglu(experts: Sequence[nn.Module]) -> bool:
    """Every expert a SwiGLU FFN expert of one shape, dtype and device (see experts/ffn.py)."""
    if not all(getattr(e, "swiglu", False) for e in experts):
        return False
    keys = {(e.module.gate_proj.weight.shape, e.module.down_proj.weight.shape, e.module.gate_proj.weight.dtype,
             e.module.gate_proj.weight.device, type(e.module.act_fn)) for e in experts}
    return len(keys) == 1


def ffn_bank(experts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """gate|up [E, d_in, 2F] and down [E, F, d_out] of same-shape SwiGLU FFN experts, as views of their weights:
    laid out once in two buffers (each expert's own fused view, `FfnExpert.fused_weights`, stays a slice)."""
    parts = [e.fused_weights() for e in experts]  # [(gate|up [d_in,2F], down [F,d_out])]
    gate_up = _adjacent([p[0] for p in parts], 0, False, True)
    down = _adjacent([p[1] for p in parts], 0, False, True)
    if gate_up is None or down is None:
        gate_up = torch.stack([p[0] for p in parts])  # new buffers
        down = torch.stack([p[1] for p in parts])
        n_ffn = gate_up.shape[2] // 2
        for i, e in enumerate(experts):
            m = e.module
            m.gate_proj.weight.data = gate_up[i, :, :n_ffn].T
            m.up_proj.weight.data = gate_up[i, :, n_ffn:].T
            m.down_proj.weight.data = down[i].T
    return gate_up, down


def _add_ffn_padded(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, slots: tuple,
                    plan: Plan) -> torch.Tensor | None:
    """out [T,d_out] + every expert slot, the experts run as one padded batch [E, C, d_in] (C = the busiest
    expert's load): two batched matmuls, no loop over experts. None when slots are fewer than experts or the
    padding would exceed its bound."""
    order, counts_dev, counts = slots
    n_exp, k = len(plan.experts), w.shape[1]
    n_slots, cap = sum(counts[2:]), max(counts[2:])
    if n_slots < n_exp or n_exp * cap > FFN_PADDED_MAX_PADDING * max(n_slots, 512):
        return None
    gate_up, down = plan.ffn_bank()  # [E,d_in,2F], [E,F,d_out]
    order = order[counts[0] + counts[1]:]  # [S], grouped by expert
    tokens = order // k  # [S]
    expert = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts_dev[2:],
                                     output_size=n_slots)  # [S]: the expert of each slot
    starts = torch.cumsum(counts_dev[2:], 0) - counts_dev[2:]  # [E]
    dest = expert * cap + torch.arange(n_slots, device=x.device) - starts[expert]  # [S] row in the padded batch
    xs = x.new_zeros(n_exp * cap, x.shape[1]).index_copy_(0, dest, x[tokens])  # [E*C, d_in]
    gate, up = torch.bmm(xs.view(n_exp, cap, -1), gate_up).chunk(2, dim=-1)  # [E, C, F] each
    y = torch.bmm(plan.experts[0].module.act_fn(gate) * up, down).view(n_exp * cap, -1)  # [E*C, d_out]
    return out.index_add_(0, tokens, y[dest] * _cast(w.reshape(-1)[order], x.dtype).unsqueeze(-1))


# ---------------------------------------------------------------------------- same-shape LoRA experts

def _lora_groups(experts: Sequence[nn.Module]) -> list[list[int]]:
    """Positions of LoRA experts that share rank, shapes, dtype and device (they can run batched)."""
    groups: dict[tuple, list[int]] = {}
    for i, e in enumerate(experts):
        a, b = e._parameters.get("lora_A"), e._parameters.get("lora_B")
        if getattr(e, "kind", None) == "lora" and a is not None and b is not None:
            groups.setdefault((a.shape, b.shape, a.dtype, a.device), []).append(i)
    return list(groups.values())


def lora_bank(experts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Stacked A [E,r,d_in], B^T [E,r,d_out] and scale ([E] or one float) of same-shape LoRA experts.

    Without autograd the stacks are views: the experts' weights are laid out once in one buffer (see
    `shared_cat`); while training they are differentiable copies."""
    a = shared_cat([e.lora_A for e in experts], dim=0, new_dim=True)  # [E, r, d_in]
    b = shared_cat([e.lora_B for e in experts], dim=0, transpose=True, new_dim=True)  # [E, r, d_out]: B^T
    return a, b, _scales(experts, a)


def _scales(experts: Sequence[nn.Module], like: torch.Tensor) -> torch.Tensor | float:
    scales = [float(e.scale) for e in experts]
    return scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=like.dtype, device=like.device)


def _add_lora_group(out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                    bank: tuple[torch.Tensor, torch.Tensor, torch.Tensor | float], positions: list[int],
                    n_experts: int) -> torch.Tensor:
    """out [T,d_out] + Σ over the group's slots (experts `positions`) of w·scale·B A x, by the measured-fastest
    strategy. bank: (A [E,r,d_in], B [E,d_out,r], scale)."""
    n_tokens, k = idx.shape
    if positions == list(range(n_experts)):
        local = idx  # [T,k]: the group is every expert of the site
    else:
        lut = torch.full((n_experts + 2,), -1, dtype=idx.dtype, device=idx.device)
        lut[torch.tensor(positions, device=idx.device) + 2] = torch.arange(len(positions), device=idx.device)
        local = lut[idx + 2]  # [T,k], -1 for slots of other experts, NULL and BASE
    a, b, scale = bank
    sel = local.clamp(min=0)  # [T,k]
    scale = scale[sel] if isinstance(scale, torch.Tensor) else scale
    coef = torch.where(local >= 0, _cast(w, x.dtype) * scale, 0.0)  # [T,k]: 0 for slots outside the group
    strategy = lora_strategy(n_tokens, k, *a.shape, b.shape[2], x.device)
    if strategy == "gathered":
        return out + _lora_gathered(x, sel, coef, a, b)
    if strategy == "dense":
        return out + _lora_dense(x, sel, coef, a, b)
    return _lora_slices(out, x, local, coef, a, b)


def lora_strategy(n_tokens: int, k: int, n_experts: int, rank: int, d_in: int, d_out: int,
                  device: torch.device) -> str:
    """"gathered", "dense" or "slices" for one group of same-shape LoRA experts (see the constants above)."""
    if device.type == "cuda":
        return "gathered" if n_tokens * k <= LORA_GATHER_MAX_SLOTS_CUDA else "dense"
    if n_tokens * k <= max(LORA_GATHER_MAX_SLOTS, n_experts // 4):
        return "gathered"
    waste = n_tokens * max(n_experts - k, 0) * rank * (d_in + d_out)
    return "dense" if waste <= LORA_DENSE_MAX_WASTE else "slices"


def _lora_gathered(x: torch.Tensor, sel: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor) -> torch.Tensor:
    """Each (token, slot) with its own adapter: x [T,d_in], sel/coef [T,k], a [E,r,d_in], b [E,r,d_out] -> [T,d_out]."""
    n_tokens, k = sel.shape
    rank, flat = a.shape[1], sel.reshape(-1)
    z = torch.bmm(a.index_select(0, flat).view(n_tokens, k * rank, -1), x.unsqueeze(-1))  # [T, k*r, 1]
    z = (z.view(n_tokens, k, rank) * coef.unsqueeze(-1)).view(n_tokens, 1, k * rank)  # [T, 1, k*r]
    return torch.bmm(z, b.index_select(0, flat).view(n_tokens, k * rank, -1)).view(n_tokens, -1)  # [T, d_out]


def _lora_dense(x: torch.Tensor, sel: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """Every adapter on every token, unselected ones weighted 0: two matmuls, no gather. -> [T,d_out]"""
    n_experts, rank, d_in = a.shape
    gate = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device).scatter_add_(1, sel, coef)  # [T,E]
    z = (x @ a.reshape(n_experts * rank, d_in).T).view(-1, n_experts, rank) * gate.unsqueeze(-1)  # [T,E,r]
    return z.view(-1, n_experts * rank) @ b.reshape(n_experts * rank, -1)  # [T, d_out]


def _lora_slices(out: torch.Tensor, x: torch.Tensor, local: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """One slice of tokens per adapter (sorted once, one host sync): out [T,d_out] + the group's deltas."""
    k = local.shape[1]
    flat = local.reshape(-1).clamp(min=-1)  # [T*k]: BASE too becomes "not this group" (-1)
    order = torch.argsort(flat, stable=True)  # other slots (-1) first
    counts = torch.bincount(flat + 1, minlength=a.shape[0] + 1).tolist()  # the one host sync
    order = order[counts[0]:]  # [S]
    tokens, weights = order // k, coef.reshape(-1)[order]  # [S], [S]
    start = 0
    for e, n in enumerate(counts[1:]):
        if n:
            rows = tokens[start:start + n]  # [n]
            z = (x[rows] @ a[e].T) * weights[start:start + n, None]  # [n, r]
            out = out.index_add_(0, rows, z @ b[e])  # + [n, d_out]
            start += n
    return out


# ---------------------------------------------------------------------------- weights in one buffer

def shared_cat(params: Sequence[torch.Tensor], *, dim: int, transpose: bool = False,
               new_dim: bool = False) -> torch.Tensor:
    """torch.cat (torch.stack with `new_dim`) of 2-D `params` (each transposed first with `transpose`) along `dim`.

    While autograd tracks the params this is a differentiable copy. Otherwise it is a view: the params are moved
    once into one buffer (each `p.data` re-pointed to its slice; values, shapes and Parameter identity kept), and
    later calls find them adjacent and return the buffer without copying. Any in-place update of a param
    (optimizer, load_state_dict, `.data` writes) lands in the buffer, so the view is never stale.
    """
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return torch.cat([_part(p, transpose, new_dim, dim) for p in params], dim)
    joined = _adjacent(params, dim, transpose, new_dim)
    if joined is None:
        joined = torch.cat([_part(p.detach(), transpose, new_dim, dim) for p in params], dim)  # one new buffer
        size = joined.shape[dim] // len(params)
        for i, p in enumerate(params):
            part = joined.narrow(dim, i * size, size)
            part = part.squeeze(dim) if new_dim else part
            p.data = part.T if transpose else part
    return joined


def _part(t: torch.Tensor, transpose: bool, new_dim: bool, dim: int) -> torch.Tensor:
    t = t.T if transpose else t
    return t.unsqueeze(dim) if new_dim else t


def _adjacent(params: Sequence[torch.Tensor], dim: int, transpose: bool, new_dim: bool) -> torch.Tensor | None:
    """The concatenation as one contiguous view of the first param's storage, if the params already are its
    slices; else None. Reads only shapes, strides and addresses (no tensor is made unless they match)."""
    first = params[0]
    shape, stride = list(first.shape), list(first.stride())
    if transpose:
        shape, stride = shape[::-1], stride[::-1]
    if new_dim:
        shape.insert(dim, 1)
        stride.insert(dim, 0)
    part_shape = list(shape)
    shape[dim] *= len(params)
    want = [1] * len(shape)  # contiguous strides of the whole
    for d in range(len(shape) - 2, -1, -1):
        want[d] = want[d + 1] * shape[d + 1]
    if any(s != w for s, w, n in zip(stride, want, part_shape) if n > 1):
        return None
    size = first.element_size()
    step, ptr = part_shape[dim] * want[dim] * size, first.data_ptr()
    for i, p in enumerate(params):
        if (p.data_ptr() != ptr + i * step or p.shape != first.shape or p.stride() != first.stride()
                or p.dtype != first.dtype or p.device != first.device):
            return None
    if (first.storage_offset() + shape[0] * want[0]) * size > first.untyped_storage().nbytes():
        return None
    return first.detach().as_strided(shape, want, first.storage_offset())


# ---------------------------------------------------------------------------- SMEAR

def merged_lora(x: torch.Tensor, routing: Routing, experts: Mapping[str, torch.nn.Module], d_out: int) -> torch.Tensor:
    """SMEAR's merged expert, per token: A_t = sum_i w_ti A_i, B_t = sum_i w_ti s_i B_i, delta = B_t A_t x.

    x: [T,d_in] -> delta [T,d_out]. Factorised (two matmuls over the stacked experts, no [T,d_out,r] tensor);
    the experts must be LoRA experts of one rank.
    """
    mods = list(experts.values())
    for name, e in experts.items():
        lora = getattr(e, "kind", None) == "lora"
        if not lora or e.lora_A.shape != mods[0].lora_A.shape:
            what = f"rank {e.lora_A.shape[0]}" if lora else f"kind {e.kind!r}"
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
