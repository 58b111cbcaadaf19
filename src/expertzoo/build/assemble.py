"""Assembling zoos from what users already have: `build` (a config's experts loaded from their sources, options
their sources impose filled in), Branch-Train-Mix averaging of the non-expert parameters, router initialisation,
and the `from_models` / `from_adapters` shortcuts."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..config import ZooConfig, load_config
from ..errors import ZooError
from ..io.base_models import load_base
from ..io.checkpoints import read_safetensors, safetensors_files
from ..io.quantize import quantize_base
from ..io.sources import first_key, is_checkpoint, param_aliases, resolve_spec, with_folder_options
from ..nn.sites import find_sites, placed_sites
from ..zoo import Zoo, provenance
from .router_init import check_init, init_router


def build(config: dict | str | Path | ZooConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
          load_sources: bool = True) -> Zoo:
    """Build a zoo from a config (dict, YAML path or ZooConfig). Pass `model`/`tokenizer` to reuse a loaded base.
    `load_sources=False` leaves experts as their kinds initialise them (weights loaded after, as `load` does)."""
    config = load_config(config)
    if model is None:
        model, tokenizer = load_base(config.base)
    if not load_sources:
        zoo = Zoo(model, tokenizer, config)
    else:
        config = with_folder_options(config)  # `from: DIR` takes the folder's options
        config = prepare_config(config, model)  # sources checked, PEFT ranks taken
        zoo = Zoo(model, tokenizer, config)
        fill_from_sources(zoo)
        finish_build(zoo)  # non_expert_params: average; router init from prompts
    quantize_base(zoo.model, config.quantize)  # the base's projections only, once the experts are in
    return zoo


def fill_from_sources(zoo: Zoo) -> None:
    """Load every expert that has a `from:` source at each of its sites (then cast to the base's dtype), and record
    where it came from (`Zoo.provenance`)."""
    dtype = next(zoo.model.parameters()).dtype
    for spec in zoo.zoo_config.experts:
        if spec.source is not None:
            for layer in zoo.layers_of(spec.name):
                layer.experts[spec.name].load_source(spec.source, layer.site)
                layer.experts[spec.name].to(dtype)
            zoo.provenance[spec.name] = provenance(spec, zoo.layers_of(spec.name))


def prepare_config(config: ZooConfig, model: nn.Module) -> ZooConfig:
    """The config a fresh build uses: sources checked, options their sources impose filled in."""
    n_layers = model.config.num_hidden_layers
    placements = {s.name: config.placement(s, n_layers) for s in config.experts}
    _, where = placed_sites(model, placements) if placements else ([], {})
    first = {name: find_sites(model, *placements[name])[0] for name in where if where[name]}
    specs = [resolve_spec(s, model, first.get(s.name)) for s in config.experts]
    if config.non_expert_params == "average" and not [s for s in specs if s.source and is_checkpoint(s.source)]:
        raise ZooError("non_expert_params: average needs experts with `from:` fine-tuned checkpoints to average; "
                       "add them or use non_expert_params: base")
    check_init(config)
    if specs == list(config.experts):
        return config
    return config.model_copy(update={"experts": specs})


def finish_build(zoo: Zoo) -> None:
    """After the experts are in: average the non-expert parameters if asked, then initialise the router."""
    if zoo.zoo_config.non_expert_params == "average":
        sources = [s.source for s in zoo.zoo_config.experts if s.source and is_checkpoint(s.source)]
        average_non_expert_params(zoo, sources)
    init_router(zoo)


def _key_files(source: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file of a (possibly sharded) checkpoint that holds it (headers only)."""
    out: dict[str, Path] = {}
    for f in safetensors_files(source):
        with read_safetensors(f) as h:
            out.update({k: f for k in h.keys()})
    return out


def _read(file: Path, key: str) -> torch.Tensor:
    with read_safetensors(file) as h:  # opened per tensor: only this tensor's pages are ever mapped
        return h.get_tensor(key)


@torch.no_grad()
def average_non_expert_params(zoo: Zoo, sources: list[str]) -> list[str]:
    """Set every base parameter outside the sites to its mean over the checkpoints (one tensor in memory at a
    time); they are saved with the zoo. Returns their names."""
    at_sites = {id(p) for layer in zoo.layers for p in layer.parameters()}
    names = [(n, p) for n, p in zoo.model.named_parameters() if id(p) not in at_sites]
    aliases, index = param_aliases(zoo.model), [_key_files(s) for s in sources]
    for name, param in names:
        total = param.data if param.dtype == torch.float32 else torch.empty(param.shape)  # sums in place, fp32
        for i, (source, keys) in enumerate(zip(sources, index)):
            key = first_key(aliases[id(param)], keys)  # a tied weight may be stored under any of its names
            if key is None:
                raise ZooError(f"checkpoint {source!r} lacks {name}; non_expert_params: average needs full "
                               "checkpoints of the base's architecture (or use non_expert_params: base)")
            t = _read(keys[key], key)
            if t.shape != param.shape or not torch.isfinite(t).all():
                raise ZooError(f"checkpoint {source!r}: {name} has shape {tuple(t.shape)} (base {tuple(param.shape)}) "
                               "or non-finite values; use checkpoints fine-tuned from the base")
            total.copy_(t) if i == 0 else total.add_(t.to(total.dtype))
            del t
        param.copy_(total.div_(len(sources)))
    zoo.mark_base_params([n for n, _ in names])
    return [n for n, _ in names]


def from_models(base: str, checkpoints: dict[str, str], *, sites: list[str] | None = None,
                non_expert_params: str = "base", router: dict[str, Any] | None = None, **config: Any) -> Zoo:
    """A zoo of `ffn` experts, one per fine-tuned checkpoint {name: path}, at `sites` (default the MLP blocks)."""
    experts = [{"name": n, "kind": "ffn", "from": str(p)} for n, p in checkpoints.items()]
    return build({"base": base, "sites": sites or ["mlp"], "experts": experts, "non_expert_params": non_expert_params,
                  "router": router or {"kind": "learned"}, **config})


def from_adapters(base: str, adapters: dict[str, str], *, sites: list[str], router: dict[str, Any] | None = None,
                  **config: Any) -> Zoo:
    """A zoo of `lora` experts, one per PEFT adapter folder {name: path}, at projection `sites`."""
    experts = [{"name": n, "kind": "lora", "from": str(p)} for n, p in adapters.items()]
    return build({"base": base, "sites": sites, "experts": experts, "router": router or {"kind": "learned"}, **config})
