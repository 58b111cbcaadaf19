"""Small MLP expert (residual): delta(x) = W_out act(W_in x), W_out zero-initialised so a fresh expert adds 0."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from .base import EXPERTS, Expert

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class MlpOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden: int = Field(256, ge=1)
    activation: Literal["silu", "gelu", "relu"] = "silu"


@EXPERTS.register("mlp")
class MlpExpert(Expert):
    mode = "residual"
    Options = MlpOptions

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        self.w_in = nn.Linear(self.d_in, self.options.hidden)  # [hidden, d_in]
        self.w_out = nn.Linear(self.options.hidden, self.d_out)  # [d_out, hidden]
        nn.init.zeros_(self.w_out.weight)
        nn.init.zeros_(self.w_out.bias)
        self.act = ACTIVATIONS[self.options.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        return self.w_out(self.act(self.w_in(x)))
