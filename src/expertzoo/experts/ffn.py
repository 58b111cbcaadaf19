"""FFN expert (replace): a trainable copy of the site's base module, or that module taken from a checkpoint."""
from __future__ import annotations

import copy

import torch

from .base import EXPERTS, Expert


@EXPERTS.register("ffn")
class FfnExpert(Expert):
    mode = "replace"

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        self.module = copy.deepcopy(site.module)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        return self.module(x)
