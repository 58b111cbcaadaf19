"""LoRA expert (residual): delta(x) = (alpha / rank) * B A x, with B zero-initialised so a fresh expert adds 0.
`from:` takes an expert folder or a PEFT LoRA adapter folder; saving also writes a PEFT adapter (`peft/`)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..io import peft as peft_io
from ..io.checkpoints import load_checked
from ..errors import ZooError
from ..nn.sites import Site
from .base import EXPERTS, Expert
from ..io.expert_folder import is_expert_folder

PEFT_SUBFOLDER = "peft"


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
        a, b = peft_io.load_site(source, site.name, site.module, self.options.rank, self.scale, (self.d_in, self.d_out))
        load_checked(self, {"lora_A": a, "lora_B": b}, what=f"adapter {source!r}", site_name=site.name,
                     missing_hint="save the adapter again with save_pretrained", shape_hint="use an adapter of this base")

    @classmethod
    def save_extra(cls, directory: Path, *, options: dict[str, Any], sites: list[Site], experts: list["LoraExpert"],
                   base: str) -> None:
        """Also write `directory/peft/`, a PEFT adapter of this expert (when every site is a projection)."""
        if not all(peft_io.is_projection(s.module) for s in sites):
            logging.getLogger(__name__).warning("not writing %s/%s: PEFT adapts projections, and this expert sits at "
                                                "whole blocks", directory, PEFT_SUBFOLDER)
            return
        conv1d = any(type(s.module).__name__ == "Conv1D" for s in sites)
        factors = {s.name: (e.lora_A, e.lora_B) for s, e in zip(sites, experts)}
        peft_io.write_adapter(Path(directory) / PEFT_SUBFOLDER, factors, rank=options["rank"], alpha=options["alpha"],
                              base=base, fan_in_fan_out=conv1d)
