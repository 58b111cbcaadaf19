"""PHATGOOSE router (Muqeeth et al. 2024): per expert and site a gate vector v_i, trained on the expert's own data
with everything else frozen (the expert's output scaled by sigmoid(v_i . x), `expertzoo.fit`). At inference
s_i = standardise(x) . standardise(v_i) / sqrt(d), softmax over all experts, top-k kept and renormalised."""
from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from .base import ROUTERS
from .fitted import FittedRouter


class PhatgooseOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    steps: int = Field(100, ge=1, description="gate training steps per expert")
    lr: float = Field(1e-2, gt=0.0, description="gate learning rate")
    batch_size: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0.0)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the last axis.  [..., d] -> [..., d]."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, unbiased=False).clamp(min=1e-6)


@ROUTERS.register("phatgoose")
class PhatgooseRouter(FittedRouter):
    Options = PhatgooseOptions
    fit_from = "gates"

    def __init__(self, **kw):
        super().__init__(**kw)
        self.per_expert("gates", (self.d_in,))  # [E, d] trained gate vectors

    def set_gate(self, expert_name: str, gate: torch.Tensor) -> None:
        """Store expert `expert_name`'s trained gate vector [d]."""
        self.set_rows(expert_name, gates=gate.detach())

    def scores(self, h: torch.Tensor) -> torch.Tensor:  # h: [T,d] -> [T,E]
        return standardise(h) @ standardise(self.gates).T / math.sqrt(self.d_in)

    def flops_per_token(self) -> int:
        return 2 * self.gates.numel() + 4 * self.d_in  # the dot products, plus standardising h
