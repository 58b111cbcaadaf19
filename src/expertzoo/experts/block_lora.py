"""Block LoRA expert (replace): the site's whole block (an MLP) run with a LoRA on each of its projections, so one
router decision per token per block applies to every adapted projection. `from:` takes a PEFT adapter that targets
the block's projections (a `kind: lora` PEFT source at a block site becomes this kind); saving writes `peft/`.
Attention blocks mix their tokens, so they are not run again per expert: at `sites: [attn]` each projection holds a
`lora` expert and the block's one router decides for all of them (nn/sites.py `Site.block`)."""
from __future__ import annotations

import math
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from ..errors import ZooError
from ..io import peft as peft_io
from ..io.checkpoints import load_checked
from ..io.expert_folder import is_expert_folder
from ..nn.sites import Site
from .base import EXPERTS, Expert
from .lora import PEFT_SUBFOLDER

# per call: {id(projection): factors} of the block LoRA expert whose forward is running (none outside one)
_ACTIVE: ContextVar[dict[int, "LoraFactors"] | None] = ContextVar("block_lora_active", default=None)


class _Compiled:
    """What a forward traced by `torch.compile` uses instead of `_ACTIVE` (it cannot read context variables): one
    slot for all callers, as nn/context.py's compiled calls share theirs."""

    active: dict[int, "LoraFactors"] | None = None


_COMPILED = _Compiled()
HOOKED = "_zoo_block_lora_hook"


class BlockLoraOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    targets: list[str] | None = None  # projection names in the block (e.g. [gate_proj, up_proj]); None: all of them


class LoraFactors(nn.Module):
    """A [r, d_in], B [d_out, r] of one projection; B starts at zero so a fresh expert is the base block."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))  # [r, d_in]
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))  # [d_out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., d_in] -> [..., d_out]
        return (x @ self.lora_A.T) @ self.lora_B.T * self.scale


def _add_active_delta(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a block's projection: adds the running block LoRA expert's delta, if it adapts `module`."""
    active = _COMPILED.active if torch.compiler.is_compiling() else _ACTIVE.get()
    factors = active.get(id(module)) if active is not None else None
    return None if factors is None else out + factors(args[0]).to(out.dtype)


def block_projections(block: nn.Module) -> dict[str, nn.Module]:
    """The projections (Linear, GPT-2's Conv1D) that are direct children of a block, by name."""
    return {name: m for name, m in block.named_children() if peft_io.is_projection(m)}


def _projection_dims(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape)  # Conv1D: weight [in, out]


@EXPERTS.register("block_lora")
class BlockLoraExpert(Expert):
    mode = "replace"
    Options = BlockLoraOptions

    def __init__(self, *, site: Site, options: dict[str, Any]):
        super().__init__(site=site, options=options)
        offered = block_projections(site.module)
        if not offered:
            raise ZooError(f"site {site.name} has no projections of its own; kind 'block_lora' sits at MLP blocks "
                           "(sites: [mlp]); use kind 'lora' at projection sites and at sites: [attn] (where the "
                           "attention block's one router decides for all its projections)")
        targets = self.options.targets if self.options.targets is not None else list(offered)
        chosen = [t for t in targets if t in offered]
        if not chosen:
            raise ZooError(f"block_lora targets {targets} name no projection of {site.name} (it has "
                           f"{', '.join(offered)}); set targets to some of those")
        self._projections = {name: offered[name] for name in chosen}  # the base's modules: not parameters of ours
        scale = self.options.alpha / self.options.rank
        self.factors = nn.ModuleDict({name: LoraFactors(*_projection_dims(m), self.options.rank, scale)
                                      for name, m in self._projections.items()})
        for m in self._projections.values():
            if not getattr(m, HOOKED, False):
                m.register_forward_hook(_add_active_delta)
                setattr(m, HOOKED, True)
        self._block = [site.module]  # in a list: run, never registered (its weights are the base's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, d] -> [T, d]
        active = {id(self._projections[n]): f for n, f in self.factors.items()}
        if torch.compiler.is_compiling():
            outer, _COMPILED.active = _COMPILED.active, active
            try:
                return self._block[0](x)
            finally:
                _COMPILED.active = outer
        token = _ACTIVE.set(active)
        try:
            return self._block[0](x)
        finally:
            _ACTIVE.reset(token)

    def flops_per_token(self) -> int:
        """The whole block (it is run again with the deltas) plus the LoRA factors."""
        block = sum(p.numel() for m in block_projections(self._block[0]).values() for p in m.parameters() if p.dim() >= 2)
        return 2 * block + super().flops_per_token()

    @classmethod
    def options_from_source(cls, source: str) -> dict[str, Any] | None:
        """`rank`, `alpha` and `targets` (the projection names it adapts) a PEFT adapter imposes."""
        if not peft_io.is_peft_folder(source):
            return None
        return {**peft_io.expert_options(source), "targets": peft_io.adapted_projections(source)}

    def load_source(self, source: str, site: Site) -> None:
        """An expert folder, or a PEFT adapter: its lora_A / lora_B at each target projection of this block."""
        if is_expert_folder(source):
            return super().load_source(source, site)
        if not peft_io.is_peft_folder(source):
            raise ZooError(f"`from: {source}` is neither an expert folder (expert.json) nor a PEFT adapter folder "
                           f"({peft_io.CONFIG}); give one of those for kind 'block_lora'")
        state = {}
        for name, module in self._projections.items():
            f = self.factors[name]
            a, b = peft_io.load_site(source, f"{site.name}.{name}", module, self.options.rank, f.scale,
                                     _projection_dims(module))
            state.update({f"factors.{name}.lora_A": a, f"factors.{name}.lora_B": b})
        load_checked(self, state, what=f"adapter {source!r}", site_name=site.name,
                     missing_hint="save the adapter again with save_pretrained", shape_hint="use an adapter of this base")

    @classmethod
    def save_extra(cls, directory: Path, *, options: BlockLoraOptions, sites: list[Site],
                   experts: list["BlockLoraExpert"], base: str) -> None:
        """Also write `directory/peft/`: a PEFT adapter of every adapted projection of every block."""
        factors = {f"{s.name}.{n}": (f.lora_A, f.lora_B) for s, e in zip(sites, experts) for n, f in e.factors.items()}
        conv1d = any(type(m).__name__ == "Conv1D" for e in experts for m in e._projections.values())
        peft_io.write_adapter(Path(directory) / PEFT_SUBFOLDER, factors, rank=options.rank, alpha=options.alpha,
                              base=base, fan_in_fan_out=conv1d)
