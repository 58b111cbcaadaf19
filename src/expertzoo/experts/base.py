"""The Expert contract: forward(x [T,d_in]) -> [T,d_out], a mode (replace | residual), flops_per_token(); a kind
with a batched path says which of its experts stack (`stack_key`) and runs them together (`run_stacked`)."""
from __future__ import annotations

from typing import Any, ClassVar, Hashable, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict

from ..errors import ZooError
from ..registry import EXPERTS
from ..nn.banks import BankCache
from ..nn.dispatch import Slots
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

    def __init__(self, *, site: Site, options: BaseModel | dict[str, Any]):
        super().__init__()
        self.d_in, self.d_out = site.d_in, site.d_out
        self.options = options if isinstance(options, self.Options) else self.Options(**options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d_in] -> [T, d_out]
        raise NotImplementedError

    def load_source(self, source: str, site: Site) -> None:
        """Fill the weights from `from: source`: an expert folder by default; kinds add their own formats."""
        if not is_expert_folder(source):
            raise ZooError(f"`from: {source}` is not an expert folder (no expert.json); for kind {self.kind!r} "
                           "give a folder written by `zoo train-expert` or Zoo.save_expert")
        load_expert_folder(self, source, site.name, self.kind)

    @classmethod
    def stack_key(cls, expert: "Expert") -> Hashable | None:
        """Experts of this kind with equal keys (two or more at a site) run together through `run_stacked`;
        None (the default): this expert runs alone on its slice of tokens."""
        return None

    @classmethod
    def run_stacked(cls, experts: list["Expert"], x: torch.Tensor, slots: Slots, out: torch.Tensor,
                    bank: BankCache) -> torch.Tensor:
        """out [T,d_out] + Σ over the group's slots of w·E(x) for x [T,d_in], the experts run stacked.

        `slots.local()` [T,k] names each slot's expert within `experts` (-1: not this group's), `slots.weights`
        [T,k] the routing weights; `bank` keeps the kind's stacked weights between calls (nn/banks.py)."""
        raise NotImplementedError(f"expert kind {cls.kind!r} has a stack_key but no run_stacked")

    def graph_capturable(self) -> bool:
        """Whether CUDA graphs can capture this expert's sync-free path (nothing read on the host inside it)."""
        return True

    def flops_per_token(self) -> int:
        """Multiply-adds x2 of one token through this expert (the base's share not counted)."""
        return 2 * sum(p.numel() for p in self.parameters() if p.dim() >= 2)

