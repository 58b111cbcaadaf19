"""LoRA expert (residual): delta(x) = (alpha / rank) * B A x, with B zero-initialised so a fresh expert adds 0."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from .base import EXPERTS, Expert


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
