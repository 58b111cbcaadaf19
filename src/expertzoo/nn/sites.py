"""Find the sites of any transformers causal LM: MLP blocks, attention projections, single projections."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from ..errors import ZooError

MLP_NAMES = ("mlp", "feed_forward", "ffn")
ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")


@dataclass(frozen=True)
class Site:
    """One place of the base where experts mix: `model.layers.3.mlp`, in layer 3, named `mlp` in its layer.

    `block`: the block whose one router decides for this site (`model.layers.3.self_attn` for the projections that
    `sites: [attn]` names), or None when the site has a router of its own."""

    name: str
    layer: int
    local: str
    d_in: int
    d_out: int
    module: nn.Module = field(repr=False, compare=False)
    block: str | None = None


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the longest ModuleList matching config.num_hidden_layers."""
    n = getattr(model.config, "num_hidden_layers", None)
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ZooError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of {n} layers")
    return found[0]


def _io_dims(module: nn.Module, hidden: int) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2 style: weight [in, out]
        return weight.shape[0], weight.shape[1]
    return hidden, hidden


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _unwrapped(module: nn.Module) -> nn.Module:
    """The original module of a site a zoo already wraps (its `base_layer`), else the module itself."""
    return getattr(module, "base_layer", module) if hasattr(module, "experts") else module


def _child(layer: nn.Module, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if isinstance(getattr(layer, n, None), nn.Module)), None)


def available_sites(layer: nn.Module) -> dict[str, nn.Module]:
    """Every site a layer offers, by local name: 'mlp', 'mlp.down_proj', 'self_attn.q_proj', ..."""
    out: dict[str, nn.Module] = {}
    mlp = _child(layer, MLP_NAMES)
    if mlp:
        out[mlp] = _unwrapped(getattr(layer, mlp))
    for block in filter(None, (mlp, _child(layer, ATTN_NAMES))):
        for name, sub in _unwrapped(getattr(layer, block)).named_children():
            if _is_projection(_unwrapped(sub)):
                out[f"{block}.{name}"] = _unwrapped(sub)
    order = [name.replace(".base_layer", "") for name, _ in layer.named_modules()]  # the order a forward meets them
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))


def expand_site(layer: nn.Module, site: str) -> list[str]:
    """Config names to local module paths: `mlp` -> the MLP block, `attn` -> every attention projection."""
    offered = available_sites(layer)
    mlp, attn = _child(layer, MLP_NAMES), _child(layer, ATTN_NAMES)
    if site == "mlp" and mlp:
        return [mlp]
    if site == "attn" and attn:
        return [n for n in offered if n.startswith(attn + ".")]
    head, _, tail = site.partition(".")
    alias = {"mlp": mlp, "attn": attn}.get(head, head)
    local = f"{alias}.{tail}" if tail else alias
    if local in offered:
        return [local]
    choices = ", ".join(["mlp", "attn", *offered])
    raise ZooError(f"unknown site {site!r} in {type(layer).__name__}; choose from: {choices}")


def find_sites(model: nn.Module, sites: list[str], layers: list[int]) -> list[Site]:
    """Sites in module order (the order a forward pass meets them). The projections `attn` names share their
    attention block's router (`Site.block`): one decision per token per block, applied at every projection."""
    prefix, stack = decoder_layers(model)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    wanted = {(i, local) for i in layers for s in sites for local in expand_site(stack[i], s)}
    attn = _child(stack[layers[0]], ATTN_NAMES) if layers and "attn" in sites else None
    out = []
    for i in layers:
        for local, module in available_sites(stack[i]).items():
            if (i, local) in wanted:
                d_in, d_out = _io_dims(module, hidden)
                block = f"{prefix}.{i}.{attn}" if attn and local.startswith(attn + ".") else None
                out.append(Site(f"{prefix}.{i}.{local}", i, local, d_in, d_out, module, block))
    nested = {s.name for s in out if any(t.name.startswith(s.name + ".") for t in out)}
    if nested:
        raise ZooError(f"site {sorted(nested)[0]!r} contains other chosen sites; mix either the block or its projections")
    return out


def placed_sites(model: nn.Module, placements: dict[str, tuple[list[str], list[int]]]) -> tuple[list[Site], dict[str, set[str]]]:
    """The union of several placements {owner: (sites, layers)} in module order, and the site names of each owner.

    Two owners may share a site; a block chosen by one owner and one of its projections by another is refused."""
    union: dict[str, Site] = {}
    where: dict[str, set[str]] = {}
    owner_of: dict[str, str] = {}
    for owner, (sites, layers) in placements.items():
        found = find_sites(model, sites, layers)
        where[owner] = {s.name for s in found}
        for s in found:
            union.setdefault(s.name, s)
            owner_of.setdefault(s.name, owner)
    for name in union:
        inner = next((t for t in union if t.startswith(name + ".")), None)
        if inner is not None:
            raise ZooError(f"{owner_of[name]!r} sits at {name} and {owner_of[inner]!r} at {inner}, inside it; place "
                           "both at the block or both at its projections")
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}  # a site's name is its wrapper's
    return sorted(union.values(), key=lambda s: order[s.name]), where
