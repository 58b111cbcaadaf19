"""FFN expert (replace): a trainable copy of the site's base module, or that module taken from a checkpoint.
Inference on a SwiGLU MLP takes a fast path: gate and up fused in one matmul on weights laid out [d_in, 2F]; same-shape
SwiGLU experts of a site run stacked (one padded batch on a GPU)."""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn

from ..io.checkpoints import load_site_module
from ..io.expert_folder import is_expert_folder
from ..nn.banks import BankCache, adjacent, shared_cat
from ..nn.dispatch import Slots, add_slices, cast
from ..nn.grouped import grouped_mm, native_shape
from .base import EXPERTS, Expert

# Same-shape SwiGLU FFN experts on a GPU run as one padded batch [E, C, d] (C = the busiest expert's load): a fixed
# number of kernels whatever E, when there are at least as many slots as experts and the padding stays within this
# many times the real rows (+ 512); else one slice per expert.
FFN_PADDED_DEVICES = ("cuda",)
FFN_PADDED_MAX_PADDING = 2
# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x)) (checked in transformers 5)
SWIGLU_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen3MoeMLP", "GemmaMLP", "Gemma2MLP",
                         "Gemma3MLP", "Olmo2MLP"})


def is_swiglu(module: nn.Module) -> bool:
    """True for a known SwiGLU MLP with bias-free nn.Linear projections."""
    projs = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    return (type(module).__name__ in SWIGLU_MLPS and callable(getattr(module, "act_fn", None))
            and all(isinstance(p, nn.Linear) and p.bias is None for p in projs))


@EXPERTS.register("ffn")
class FfnExpert(Expert):
    mode = "replace"

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        self.module = copy.deepcopy(site.module)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def load_source(self, source: str, site) -> None:
        """An expert folder, or a fine-tuned checkpoint of the base's architecture (its module at this site)."""
        if is_expert_folder(source):
            super().load_source(source, site)
        else:
            load_site_module(self.module, source, site)

    @property
    def swiglu(self) -> bool:
        return is_swiglu(self.module)

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate|up [d_in, 2F], down [F, d_out]) of a SwiGLU module, views of its own weights (laid out so once)."""
        m = self.module
        gate_up = shared_cat([m.gate_proj.weight, m.up_proj.weight], dim=1, transpose=True)  # [d_in, 2F]
        return gate_up, shared_cat([m.down_proj.weight], dim=1, transpose=True)  # [F, d_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        m = self.module
        if not is_swiglu(m) or (torch.is_grad_enabled() and m.gate_proj.weight.requires_grad):
            return m(x)  # training: autograd through the module's own weights (laid out as below after inference)
        gate_up, down = self.fused_weights()
        gate, up = (x @ gate_up).chunk(2, dim=-1)  # [T, F] each
        return (m.act_fn(gate) * up) @ down

    def graph_capturable(self) -> bool:
        """A stacked SwiGLU expert runs through `grouped_mm`, whose loop outside the native kernel reads the group
        ends on the host (nn/grouped.py)."""
        m = self.module
        return not self.swiglu or native_shape(m.gate_proj.weight.dtype, *m.gate_proj.weight.shape,
                                               *m.down_proj.weight.shape)

    @classmethod
    def stack_key(cls, expert: "FfnExpert") -> tuple | None:
        """SwiGLU FFN experts of one shape, dtype, device and activation run stacked."""
        if not expert.swiglu:
            return None
        m = expert.module
        return m.gate_proj.weight.shape, m.down_proj.weight.shape, m.gate_proj.weight.dtype, \
            m.gate_proj.weight.device, type(m.act_fn)

    @classmethod
    def run_stacked(cls, experts: list["FfnExpert"], x: torch.Tensor, slots: Slots, out: torch.Tensor,
                    bank: BankCache) -> torch.Tensor:
        """Without autograd and host syncs (`slots.sync_free`): grouped matmuls. Else one padded batch when the group
        is every expert of the site, on a device where that pays and without autograd; else one slice of tokens per
        expert."""
        if slots.sync_free and not torch.is_grad_enabled():
            return add_grouped(out, x, slots, experts, bank)
        if slots.whole_site and x.device.type in FFN_PADDED_DEVICES and not torch.is_grad_enabled():
            done = add_padded(out, x, slots, experts, bank)
            if done is not None:
                return done
        return add_slices(out, x, slots, experts, slots.positions)


# ---------------------------------------------------------------------------- the stacked path

def ffn_bank(experts: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """gate|up [E, d_in, 2F] and down [E, F, d_out] of same-shape SwiGLU FFN experts, as views of their weights:
    laid out once in two buffers (each expert's own fused view, `FfnExpert.fused_weights`, stays a slice)."""
    parts = [e.fused_weights() for e in experts]  # [(gate|up [d_in,2F], down [F,d_out])]
    if torch.compiler.is_compiling():  # traced with no eager bank yet: copies (nothing re-pointed while tracing)
        return torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])
    gate_up = adjacent([p[0] for p in parts], 0, False, True)
    down = adjacent([p[1] for p in parts], 0, False, True)
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


def add_grouped(out: torch.Tensor, x: torch.Tensor, slots: Slots, experts: list[FfnExpert],
                bank: BankCache) -> torch.Tensor:
    """out [T,d_out] + the group's slots, every expert's rows in one grouped matmul per projection (nn/grouped.py):
    no shape depends on routing values, no host sync."""
    params = [p for e in experts for p in (e.module.gate_proj.weight, e.module.up_proj.weight, e.module.down_proj.weight)]
    gate_up, down = bank.get(params, lambda: ffn_bank(experts))  # [E,d_in,2F], [E,F,d_out]
    order, ends, tokens = slots.grouped()  # [T*k], [E], [T*k]
    gate, up = grouped_mm(x[tokens], gate_up, ends).chunk(2, dim=-1)  # [T*k, F] each; rows past ends[-1] 0
    y = grouped_mm(experts[0].module.act_fn(gate) * up, down, ends)  # [T*k, d_out]
    w = torch.where(slots.local() >= 0, slots.weights, 0.0).reshape(-1)[order]  # [T*k]
    return out.index_add(0, tokens, y * cast(w, x.dtype).unsqueeze(-1))


def add_padded(out: torch.Tensor, x: torch.Tensor, slots: Slots, experts: list[FfnExpert],
               bank: BankCache) -> torch.Tensor | None:
    """out [T,d_out] + every expert slot, the experts run as one padded batch [E, C, d_in] (C = the busiest
    expert's load): two batched matmuls, no loop over experts. None when slots are fewer than experts or the
    padding would exceed its bound."""
    order, counts_dev, counts = slots.sorted()
    n_exp, k = len(experts), slots.idx.shape[1]
    n_slots, cap = sum(counts[2:]), max(counts[2:])
    if n_slots < n_exp or n_exp * cap > FFN_PADDED_MAX_PADDING * max(n_slots, 512):
        return None
    params = [p for e in experts for p in (e.module.gate_proj.weight, e.module.up_proj.weight, e.module.down_proj.weight)]
    gate_up, down = bank.get(params, lambda: ffn_bank(experts))  # [E,d_in,2F], [E,F,d_out]
    order = order[counts[0] + counts[1]:]  # [S], grouped by expert
    tokens = order // k  # [S]
    expert = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts_dev[2:],
                                     output_size=n_slots)  # [S]: the expert of each slot
    starts = torch.cumsum(counts_dev[2:], 0) - counts_dev[2:]  # [E]
    dest = expert * cap + torch.arange(n_slots, device=x.device) - starts[expert]  # [S] row in the padded batch
    xs = x.new_zeros(n_exp * cap, x.shape[1]).index_copy_(0, dest, x[tokens])  # [E*C, d_in]
    gate, up = torch.bmm(xs.view(n_exp, cap, -1), gate_up).chunk(2, dim=-1)  # [E, C, F] each
    y = torch.bmm(experts[0].module.act_fn(gate) * up, down).view(n_exp * cap, -1)  # [E*C, d_out]
    return out.index_add_(0, tokens, y[dest] * cast(slots.weights.reshape(-1)[order], x.dtype).unsqueeze(-1))
