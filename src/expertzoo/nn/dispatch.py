"""Dispatch: mix a site's base and its routed experts, y = c(x)·base(x) + Σ_slots w·E(x). `mix` groups the site's
experts by their kind's stack key and hands each group of two or more to its kind's `run_stacked` (experts/base.py);
the rest run once each on their slice of tokens (one sort, one host sync for all). Null slots never reach an expert.
`mix_reference` is the plain path `mix` must equal. Dispatch knows no expert kind.

Under `torch.compile` and on an accelerator the dispatch is sync-free (`sync_free`): no shape depends on routing
values, nothing is read back to the host. Kinds then take their sync-free paths (`Slots.sync_free`: gathered, dense
or grouped matmuls, nn/grouped.py); experts without a stacked path run on every token, weighted by their slots."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Callable, Hashable, Mapping, Sequence

import torch
import torch.nn as nn

from .banks import BankCache
from .routing import BASE, NULL, Routing


def sync_free(x: torch.Tensor) -> bool:
    """Dispatch x without host syncs: inside `torch.compile` (a sync breaks the graph) and on an accelerator (a
    sync stalls the launch queue). An eager CPU dispatch reads its slot counts once, which is fastest there."""
    return torch.compiler.is_compiling() or x.device.type != "cpu"


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
    if routing.merge is not None:  # the router merges the experts (SMEAR) instead of dispatching to each
        return base * coef.to(base.dtype).unsqueeze(-1) + routing.merge(x, routing, experts, d_out)
    return combine(x, routing, mods, base, coef, d_out)


# ---------------------------------------------------------------------------- the fast path

@dataclass
class Group:
    """Same-kind experts whose kind runs them stacked: their positions among the site's experts, and the bank
    (stacked weights) the kind keeps between calls."""

    kind: type
    positions: list[int]
    bank: BankCache = field(default_factory=BankCache)


class Plan:
    """What `mix` derives once from a site's experts (a layer keeps it until its experts change): which experts
    are residual, which groups run stacked (two or more experts of one kind with equal `stack_key`), which alone."""

    def __init__(self, experts: list[nn.Module]):
        self.experts = experts
        self.residual = [e.mode == "residual" for e in experts]
        keyed: dict[tuple[type, Hashable], list[int]] = {}
        for i, e in enumerate(experts):
            key = stack_key(e)
            if key is not None:
                keyed.setdefault((type(e), key), []).append(i)
        self.groups = [Group(kind, positions) for (kind, _), positions in keyed.items() if len(positions) > 1]
        stacked = {i for g in self.groups for i in g.positions}
        self.singles = [i for i in range(len(experts)) if i not in stacked]

    def fits(self, experts: list[nn.Module]) -> bool:
        return len(experts) == len(self.experts) and all(a is b for a, b in zip(experts, self.experts))


def stack_key(expert: nn.Module) -> Hashable | None:
    """The expert's kind's stack key (None: the kind has no stacked path, or this expert cannot take it)."""
    key_of = getattr(type(expert), "stack_key", None)
    return None if key_of is None else key_of(expert)


class Slots:
    """The routing's (token, slot) pairs as a kind's stacked path reads them. idx, weights: [T,k]; `positions`:
    the group's experts among the site's `n_experts`. `sorted()` is shared by every group of one call."""

    def __init__(self, idx: torch.Tensor, weights: torch.Tensor, n_experts: int,
                 positions: list[int] | None = None, shared: dict[str, Any] | None = None, *, sync_free: bool = False,
                 plain: bool = False):
        self.idx, self.weights, self.n_experts = idx, weights, n_experts
        self.positions = list(range(n_experts)) if positions is None else positions
        self._shared = {} if shared is None else shared
        self.sync_free = sync_free  # the kind must not read routing values on the host (see `sync_free()`)
        self.plain = plain  # known on the host: every slot holds one of the site's experts (no NULL, no BASE)

    def of(self, positions: list[int]) -> "Slots":
        """The same slots, seen by the group of experts at `positions`."""
        return Slots(self.idx, self.weights, self.n_experts, positions, self._shared, sync_free=self.sync_free,
                     plain=self.plain)

    @property
    def every_slot_here(self) -> bool:
        """Every slot holds an expert of this group (known on the host): `local()` is `idx`, with no -1."""
        return self.plain and self.whole_site

    @property
    def whole_site(self) -> bool:
        """The group is every expert of the site."""
        return self.positions == list(range(self.n_experts))

    def local(self) -> torch.Tensor:
        """[T,k]: each slot's expert as a position in the group, -1 for slots of other experts, NULL and BASE."""
        if self.whole_site:
            return self.idx
        lut = torch.full((self.n_experts + 2,), -1, dtype=self.idx.dtype, device=self.idx.device)
        lut[torch.tensor(self.positions, device=self.idx.device) + 2] = torch.arange(len(self.positions),
                                                                                      device=self.idx.device)
        return lut[self.idx + 2]

    def grouped(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The group's slots sorted by expert for `grouped_mm`, on the device: (order [T*k] of the flat slots, the
        group's slots first, expert by expert; ends [G] int32, the cumulative row ends; tokens [T*k] = order // k).
        Rows past ends[-1] are other slots (NULL, BASE, other groups). No host sync."""
        local = self.local().reshape(-1)  # [T*k]
        n_group = len(self.positions)
        key = torch.where(local >= 0, local, n_group)  # other slots last
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(n_group + 1, dtype=torch.int32, device=key.device).scatter_add_(
            0, key, torch.ones_like(key, dtype=torch.int32))  # [G+1], a fixed shape (bincount's is not)
        return order, torch.cumsum(counts[:n_group], 0, dtype=torch.int32), order // self.idx.shape[1]

    def sorted(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The slots sorted by index, BASE, NULL, expert 0, 1, ...: (order [T*k], counts [E+2] on the device, the
        same counts on the host). Made once per call: the one host sync for all experts."""
        if "sorted" not in self._shared:
            self._shared["sorted"] = sorted_slots(self.idx, self.n_experts)
        return self._shared["sorted"]


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
    free = sync_free(x)
    slots = Slots(idx, w, len(mods), sync_free=free, plain=routing.normalised)
    site_residual = not mods or any(plan.residual) or idx.shape[1] == 0
    # whether BASE slots exist: the router says whether they can (sync-free), else the sorted counts say
    if routing.normalised and mods and all(plan.residual):
        out = base_fn()  # c(x) = the slots' weights, which sum to 1 (no NULL or BASE slot): base(x) as it is
    elif site_residual or (routing.may_use_base if free else slots.sorted()[2][0]):
        base = base_fn()  # [T, d_out]
        out = base * cast(_base_weight(idx, w, plan.residual, site_residual), base.dtype).unsqueeze(-1)
    else:
        out = x.new_zeros(x.shape[0], d_out)
    if routing.merge is not None:  # the router merges the experts (SMEAR) instead of dispatching to each
        return out + routing.merge(x, routing, experts, d_out)
    if not mods or idx.shape[1] == 0:
        return out
    for group in plan.groups:
        members = [mods[i] for i in group.positions]
        out = group.kind.run_stacked(members, x, slots.of(group.positions), out, group.bank)
    if plan.singles:
        add = add_dense if free else add_slices
        out = add(out, x, slots, [mods[i] for i in plan.singles], plan.singles)
    return out


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


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def sorted_slots(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The (token, slot) pairs of idx [T,k] sorted by index, BASE then NULL then expert 0, 1, ...: (order [T*k],
    counts [E+2] on the device, the same counts on the host). The one host sync for all experts."""
    flat = idx.reshape(-1)  # [T*k]
    counts = torch.bincount(flat + 2, minlength=n_experts + 2)  # [E+2]
    return torch.argsort(flat, stable=True), counts, counts.tolist()


def add_dense(out: torch.Tensor, x: torch.Tensor, slots: Slots, experts: Sequence[nn.Module],
              positions: Sequence[int]) -> torch.Tensor:
    """out [T,d_out] + the slots of `experts` (at `positions` among the site's), each run on every token and
    weighted by its slots (0 where unchosen): no shape depends on routing values."""
    for expert, i in zip(experts, positions):
        w = (slots.weights * (slots.idx == i)).sum(-1)  # [T]
        out = out + expert(x) * cast(w, x.dtype).unsqueeze(-1)
    return out


def add_slices(out: torch.Tensor, x: torch.Tensor, slots: Slots, experts: Sequence[nn.Module],
               positions: Sequence[int]) -> torch.Tensor:
    """out [T,d_out] + the slots of `experts` (at `positions` among the site's), each run once on its slice."""
    order, _, counts = slots.sorted()
    k = slots.idx.shape[1]
    order = order[counts[0] + counts[1]:]  # [S] expert slots, grouped by expert
    tokens, weights = order // k, cast(slots.weights.reshape(-1)[order], x.dtype)  # [S], [S]
    starts = list(accumulate(counts[2:], initial=0))
    grad = torch.is_grad_enabled()  # an expert's output may be needed by its own backward: no in-place then
    for expert, i in zip(experts, positions):
        lo, hi = starts[i], starts[i + 1]
        if hi > lo:
            rows = tokens[lo:hi]  # [n]
            y = expert(x[rows])  # [n, d_out]
            y = y * weights[lo:hi, None] if grad else y.mul_(weights[lo:hi, None])
            out = out.index_add_(0, rows, y)
    return out
