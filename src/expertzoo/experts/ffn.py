"""FFN expert (replace): a trainable copy of the site's base module, or that module taken from a checkpoint.
Inference on a SwiGLU MLP takes a fast path: gate and up fused in one matmul on weights laid out [d_in, 2F]."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..io.checkpoints import load_site_module
from ..nn.dispatch import shared_cat
from .base import EXPERTS, Expert
from ..io.expert_folder import is_expert_folder

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
