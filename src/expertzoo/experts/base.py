"""The Expert contract: forward(x [T,d_in]) -> [T,d_out], a mode (replace | residual), flops_per_token()."""
from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..errors import ZooError
from ..registry import EXPERTS
from ..nn.sites import Site
from ..io.expert_folder import is_expert_folder, load_expert_folder


__all__ = ["EXPERTS", "Expert", "NoOptions"]


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(nn.Module):
    """A module mixed at a site. Residual experts return a delta on top of base(x); replace experts an output."""

    kind: ClassVar[str]
    mode: ClassVar[Literal["replace", "residual"]]
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, *, site: Site, options: dict[str, Any]):
        super().__init__()
        self.d_in, self.d_out = site.d_in, site.d_out
        self.options = self.Options(**options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        raise NotImplementedError

    def load_source(self, source: str, site: Site) -> None:
        """Fill the weights from `from: source`: an expert folder by default; kinds add their own formats."""
        if not is_expert_folder(source):
            raise ZooError(f"`from: {source}` is not an expert folder (no expert.json); for kind {self.kind!r} "
                           "give a folder written by `zoo train-expert` or Zoo.save_expert")
        load_expert_folder(self, source, site.name, self.kind)

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token through this expert (the base's share not counted)."""
        return 2 * sum(p.numel() for p in self.parameters() if p.dim() >= 2)

