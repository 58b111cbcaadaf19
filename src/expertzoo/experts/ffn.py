"""FFN expert (replace): a trainable copy of the site's base module, or that module taken from a checkpoint."""
from __future__ import annotations

import copy

import torch

from ..checkpoints import load_site_module
from .base import EXPERTS, Expert
from .folder import is_expert_folder


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        return self.module(x)
