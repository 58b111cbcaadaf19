"""LoRA expert (residual): delta(x) = (alpha / rank) * B A x, with B zero-initialised so a fresh expert adds 0.
`from:` takes an expert folder or a PEFT LoRA adapter folder; saving also writes a PEFT adapter (`peft/`)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ZooError
from ..io import peft as peft_io
from ..io.checkpoints import load_checked
from ..io.expert_folder import is_expert_folder
from ..nn.banks import BankCache, shared_cat
from ..nn.dispatch import Slots, cast
from ..nn.grouped import grouped_mm
from ..nn.sites import Site
from .base import EXPERTS, Expert

PEFT_SUBFOLDER = "peft"
# Strategies, chosen per call by what bench/strategies.py and bench/layer.py measured (docs/results/):
# same-shape LoRA experts run gathered per slot (two batched matmuls, no sort, no host sync) for few (token, slot)
# pairs, densely (every adapter on every token: two plain matmuls, no sync) while the work spent on unselected
# adapters stays small, else one slice of tokens per adapter (one sort, one host sync). On a GPU kernel launches
# and syncs cost more than flops: gathered up to LORA_GATHER_MAX_SLOTS_CUDA pairs, dense beyond.
LORA_GATHER_MAX_SLOTS = 4  # ... or up to E // 4 pairs: gathering costs per pair, the others grow with E
LORA_DENSE_MAX_WASTE = 150e6  # multiply-adds on unselected adapters: T * (E - k) * r * (d_in + d_out)
LORA_GATHER_MAX_SLOTS_CUDA = 1024


class LoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)


@EXPERTS.register("lora")
class LoraExpert(Expert):
    mode = "residual"
    Options = LoraOptions

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        r = self.options.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.d_in))  # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(self.d_out, r))  # [d_out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = self.options.alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale

    @classmethod
    def stack_key(cls, expert: "LoraExpert") -> tuple:
        """LoRA experts of one rank, shapes, dtype and device run stacked."""
        a, b = expert.lora_A, expert.lora_B
        return a.shape, b.shape, a.dtype, a.device

    @classmethod
    def run_stacked(cls, experts: list["LoraExpert"], x: torch.Tensor, slots: Slots, out: torch.Tensor,
                    bank: BankCache) -> torch.Tensor:
        """out [T,d_out] + Σ over the group's slots of w·scale·B A x, by the measured-fastest strategy."""
        params = [p for e in experts for p in e._parameters.values()]  # lora_A, lora_B (no Module.__getattr__)
        a, b, scale = bank.get(params, lambda: lora_bank(experts))  # [E,r,d_in], [E,r,d_out], float | [E]
        n_tokens, k = slots.idx.shape
        w = cast(slots.weights, x.dtype)
        local = None if slots.every_slot_here else slots.local()  # [T,k], -1 for other experts' slots, NULL, BASE
        sel = slots.idx if local is None else local.clamp(min=0)  # [T,k]
        coef = w * (scale[sel] if isinstance(scale, torch.Tensor) else scale)  # [T,k]
        if local is not None:
            coef = torch.where(local >= 0, coef, 0.0)  # 0 outside the group
        strategy = lora_strategy(n_tokens, k, *a.shape, b.shape[2], x.device)
        if strategy == "gathered":
            return out + lora_gathered(x, sel, coef, a, b)
        if strategy == "dense":
            return out + lora_dense(x, sel, coef, a, b)
        if slots.sync_free:  # no host sync: grouped matmuls (no autograd through them), or every adapter densely
            return out + lora_dense(x, sel, coef, a, b) if torch.is_grad_enabled() else \
                lora_grouped(out, x, slots, coef, a, b)
        return lora_slices(out, x, slots.local(), coef, a, b)

    @classmethod
    def options_from_source(cls, source: str) -> dict[str, Any] | None:
        """`rank` and `alpha` a PEFT adapter imposes (they replace the config's); None for other sources."""
        return peft_io.expert_options(source) if peft_io.is_peft_folder(source) else None

    def load_source(self, source: str, site: Site) -> None:
        """An expert folder, or a PEFT LoRA adapter folder (its lora_A / lora_B at this site, scaling folded in)."""
        if is_expert_folder(source):
            return super().load_source(source, site)
        if not peft_io.is_peft_folder(source):
            raise ZooError(f"`from: {source}` is neither an expert folder (expert.json) nor a PEFT adapter folder "
                           f"({peft_io.CONFIG}); give one of those for kind 'lora'")
        if site.block is not None and peft_io.leaves_alone(source, site.name, site.block):
            return  # one expert of the block: at a projection the adapter leaves alone it stays fresh (B = 0: adds 0)
        a, b = peft_io.load_site(source, site.name, site.module, self.options.rank, self.scale, (self.d_in, self.d_out))
        load_checked(self, {"lora_A": a, "lora_B": b}, what=f"adapter {source!r}", site_name=site.name,
                     missing_hint="save the adapter again with save_pretrained", shape_hint="use an adapter of this base")

    @classmethod
    def save_extra(cls, directory: Path, *, options: LoraOptions, sites: list[Site], experts: list["LoraExpert"],
                   base: str) -> None:
        """Also write `directory/peft/`, a PEFT adapter of this expert (when every site is a projection)."""
        if not all(peft_io.is_projection(s.module) for s in sites):
            logging.getLogger(__name__).warning("not writing %s/%s: PEFT adapts projections, and this expert sits at "
                                                "whole blocks", directory, PEFT_SUBFOLDER)
            return
        conv1d = any(type(s.module).__name__ == "Conv1D" for s in sites)
        factors = {s.name: (e.lora_A, e.lora_B) for s, e in zip(sites, experts)}
        peft_io.write_adapter(Path(directory) / PEFT_SUBFOLDER, factors, rank=options.rank, alpha=options.alpha,
                              base=base, fan_in_fan_out=conv1d)


# ---------------------------------------------------------------------------- the stacked path

def lora_bank(experts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
    """Stacked A [E,r,d_in] and B^T [E,r,d_out] of same-shape LoRA experts, and their scales (one float when equal).

    Without autograd the stacks are views: the experts' weights are laid out once in one buffer (see
    `shared_cat`); while training they are differentiable copies."""
    a = shared_cat([e.lora_A for e in experts], dim=0, new_dim=True)  # [E, r, d_in]
    b = shared_cat([e.lora_B for e in experts], dim=0, transpose=True, new_dim=True)  # [E, r, d_out]: B^T
    return a, b, _scales(experts, a)


def _scales(experts: Sequence[nn.Module], like: torch.Tensor) -> torch.Tensor | float:
    scales = [float(e.scale) for e in experts]
    return scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=like.dtype, device=like.device)


def lora_strategy(n_tokens: int, k: int, n_experts: int, rank: int, d_in: int, d_out: int,
                  device: torch.device) -> str:
    """"gathered", "dense" or "slices" for one group of same-shape LoRA experts (see the constants above)."""
    if device.type == "cuda":
        return "gathered" if n_tokens * k <= LORA_GATHER_MAX_SLOTS_CUDA else "dense"
    if n_tokens * k <= max(LORA_GATHER_MAX_SLOTS, n_experts // 4):
        return "gathered"
    waste = n_tokens * max(n_experts - k, 0) * rank * (d_in + d_out)
    return "dense" if waste <= LORA_DENSE_MAX_WASTE else "slices"


def lora_gathered(x: torch.Tensor, sel: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
                   b: torch.Tensor) -> torch.Tensor:
    """Each (token, slot) with its own adapter: x [T,d_in], sel/coef [T,k], a [E,r,d_in], b [E,r,d_out] -> [T,d_out]."""
    n_tokens, k = sel.shape
    rank, flat = a.shape[1], sel.reshape(-1)
    z = torch.bmm(a.index_select(0, flat).view(n_tokens, k * rank, -1), x.unsqueeze(-1))  # [T, k*r, 1]
    z = (z.view(n_tokens, k, rank) * coef.unsqueeze(-1)).view(n_tokens, 1, k * rank)  # [T, 1, k*r]
    return torch.bmm(z, b.index_select(0, flat).view(n_tokens, k * rank, -1)).view(n_tokens, -1)  # [T, d_out]


def lora_dense(x: torch.Tensor, sel: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
    """Every adapter on every token, unselected ones weighted 0: two matmuls, no gather. -> [T,d_out]"""
    n_experts, rank, d_in = a.shape
    gate = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device).scatter_add_(1, sel, coef)  # [T,E]
    z = (x @ a.reshape(n_experts * rank, d_in).T).view(-1, n_experts, rank) * gate.unsqueeze(-1)  # [T,E,r]
    return z.view(-1, n_experts * rank) @ b.reshape(n_experts * rank, -1)  # [T, d_out]


def lora_grouped(out: torch.Tensor, x: torch.Tensor, slots: Slots, coef: torch.Tensor, a: torch.Tensor,
                 b: torch.Tensor) -> torch.Tensor:
    """The slices' result without their host sync: rows sorted by adapter, two grouped matmuls (nn/grouped.py)
    -> out [T,d_out] + the group's deltas."""
    order, ends, tokens = slots.grouped()  # [T*k], [E], [T*k]
    z = grouped_mm(x[tokens], a.transpose(1, 2), ends) * coef.reshape(-1)[order].unsqueeze(-1)  # [T*k, r]
    return out.index_add(0, tokens, grouped_mm(z, b, ends))


def lora_slices(out: torch.Tensor, x: torch.Tensor, local: torch.Tensor, coef: torch.Tensor, a: torch.Tensor,
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
