"""Pruning a zoo (UNCURL; Merge-then-Compress): keep the N experts most used on task data and drop the rest, or,
with merge, fold each dropped expert into the kept expert of the same kind and shape whose outputs on the task's
site inputs are most alike, weighted by routing frequency. Global pruning ranks experts by their share of routed
slots summed over every site; per-site pruning (UNCURL per layer) ranks the experts placed at each site by their
share of that site's slots and removes an expert only where it is not kept (its spec's `at` records where it stays)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..data import Example, feed, pad_id
from ..errors import ZooError
from ..evaluation.evaluate import evaluate
from ..zoo import Zoo

Merger = Callable[[list[torch.nn.Module], list[float]], dict[str, torch.Tensor]]


@torch.no_grad()
def site_inputs(zoo: Zoo, examples: list[Example], *, pad_id: int, tokens: int = 256) -> dict[str, torch.Tensor]:
    """Up to `tokens` real-token inputs per site, from the zoo's own forward: {site: [n,d_in]}."""
    found: dict[str, list[torch.Tensor]] = {layer.site.name: [] for layer in zoo.layers}

    def grab(layer, args, out):
        x = args[0]
        found[layer.site.name].append(x.reshape(-1, x.shape[-1])[zoo.ctx.batch_mask(x).reshape(-1)].float())

    hooks = [layer.register_forward_hook(grab) for layer in zoo.layers]
    try:
        feed(zoo, examples, pad_id=pad_id, batch_size=4, max_tokens=tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return {site: torch.cat(xs)[:tokens] for site, xs in found.items() if xs}


@torch.no_grad()
def similarity(zoo: Zoo, a: str, b: str, inputs: dict[str, torch.Tensor], sites: set[str] | None = None) -> float:
    """Mean over the sites both sit at (or over `sites`) of the cosine between two experts' outputs (deltas for
    residual experts) on the same inputs; -1 where they share no site."""
    sims = []
    for layer in zoo.layers:
        if a not in layer.experts or b not in layer.experts or (sites is not None and layer.site.name not in sites):
            continue
        x = inputs[layer.site.name].to(next(layer.parameters()).dtype)
        ya, yb = layer.experts[a](x).flatten().float(), layer.experts[b](x).flatten().float()
        sims.append(float(F.cosine_similarity(ya, yb, dim=0)))
    return sum(sims) / len(sims) if sims else -1.0


def average(experts: list[torch.nn.Module], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of every tensor of the state dicts (parameters and buffers) of same-shape experts."""
    states = [e.state_dict() for e in experts]
    return {k: sum(w * s[k].float() for w, s in zip(weights, states)).to(states[0][k].dtype) for k in states[0]}


def merge_lora(experts: list[torch.nn.Module], weights: list[float]) -> dict[str, torch.Tensor]:
    """LoRA: the weighted mean of the products scale * B A, factorised back to the first expert's rank by SVD
    (averaging A and B separately would mix cross terms)."""
    target = experts[0]
    delta = sum(w * e.scale * (e.lora_B.float() @ e.lora_A.float()) for w, e in zip(weights, experts))  # [d_out,d_in]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    r = target.lora_A.shape[0]
    root = s[:r].sqrt()  # [r]
    return {"lora_A": (root[:, None] * vh[:r]).to(target.lora_A.dtype),
            "lora_B": (u[:, :r] * root[None] / target.scale).to(target.lora_B.dtype)}


MERGERS: dict[str, Merger] = {"lora": merge_lora}  # kinds whose weights do not average well; the rest: `average`


def plan(zoo: Zoo, usage: dict[str, float], keep: int, merge: bool,
         inputs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Which experts stay (the `keep` most used; ties by config order), go, and where merged ones go."""
    names = zoo.expert_names
    if keep < 1:
        raise ZooError(f"--keep {keep} would leave no expert; keep at least 1")
    ranked = sorted(names, key=lambda n: (-usage[n], names.index(n)))
    kept, dropped = [n for n in names if n in ranked[:keep]], [n for n in names if n not in ranked[:keep]]
    specs = {e.name: e for e in zoo.zoo_config.experts}
    into: dict[str, str | None] = {}
    for name in dropped if merge else []:
        peers = [k for k in kept if specs[k].kind == specs[name].kind and specs[k].options == specs[name].options]
        into[name] = max(peers, key=lambda k: similarity(zoo, name, k, inputs)) if peers else None
    return {"kept": kept, "dropped": dropped, "merged_into": into}


@torch.no_grad()
def apply(zoo: Zoo, decided: dict[str, Any], usage: dict[str, float]) -> None:
    """Merge (per site, weighted by usage) and remove experts as `plan` decided."""
    kinds = {e.name: e.kind for e in zoo.zoo_config.experts}
    for target in decided["kept"]:
        group = [target] + [d for d, k in decided["merged_into"].items() if k == target]
        if len(group) == 1:
            continue
        raw = [usage[n] for n in group]
        weights = [u / sum(raw) for u in raw] if sum(raw) > 0 else [1 / len(group)] * len(group)
        merger = MERGERS.get(kinds[target], average)
        for layer in zoo.layers_of(target):
            here = [n for n in group if n in layer.experts]
            if len(here) > 1:
                total = sum(weights[group.index(n)] for n in here)
                state = merger([layer.experts[n] for n in here], [weights[group.index(n)] / total for n in here])
                layer.experts[target].load_state_dict(state, strict=False)
    for name in decided["dropped"]:
        zoo.remove_expert(name)


def plan_sites(zoo: Zoo, site_share: dict[str, dict[str, float]], keep: int, merge: bool,
               inputs: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Per site: the `keep` experts placed there with the largest share of its slots (ties by config order) stay,
    the others go there, merged (with `merge`) into the most alike kept expert of their kind and options there."""
    names, specs = zoo.expert_names, {e.name: e for e in zoo.zoo_config.experts}
    sites: dict[str, Any] = {}
    for layer in zoo.layers:
        here = list(layer.experts)
        share = site_share.get(layer.site.name, {})
        ranked = sorted(here, key=lambda n: (-share.get(n, 0.0), names.index(n)))
        kept = [n for n in here if n in ranked[:keep]]
        into: dict[str, str | None] = {}
        for name in [n for n in here if n not in kept] if merge else []:
            peers = [k for k in kept if specs[k].kind == specs[name].kind and specs[k].options == specs[name].options]
            into[name] = max(peers, key=lambda k: similarity(zoo, name, k, inputs, {layer.site.name})) \
                if peers else None
        sites[layer.site.name] = {"kept": kept, "dropped": [n for n in here if n not in kept], "merged_into": into}
    return sites


@torch.no_grad()
def apply_sites(zoo: Zoo, sites: dict[str, Any], site_share: dict[str, dict[str, float]]) -> None:
    """Merge (weighted by each site's usage) and remove experts site by site, as `plan_sites` decided."""
    layers = {l.site.name: l for l in zoo.layers}
    kinds = {e.name: e.kind for e in zoo.zoo_config.experts}
    for site, decided in sites.items():
        for target in decided["kept"]:
            group = [target] + [d for d, k in decided["merged_into"].items() if k == target]
            if len(group) > 1:
                raw = [site_share.get(site, {}).get(n, 0.0) for n in group]
                weights = [u / sum(raw) for u in raw] if sum(raw) > 0 else [1 / len(group)] * len(group)
                state = MERGERS.get(kinds[target], average)([layers[site].experts[n] for n in group], weights)
                layers[site].experts[target].load_state_dict(state, strict=False)
    for name in list(zoo.expert_names):
        gone = [site for site, decided in sites.items() if name in decided["dropped"]]
        if gone:
            zoo.remove_expert_at(name, gone)


def prune(zoo: Zoo, examples: list[Example], *, keep: int, merge: bool = False, per_site: bool = False,
          batch_size: int = 8, progress: bool = True) -> dict[str, Any]:
    """Prune `zoo` in place to `keep` experts by usage on `examples` (`per_site`: `keep` experts at each site);
    returns the report (NLL before and after)."""
    pad = pad_id(zoo.tokenizer)
    most = max((len(l.experts) for l in zoo.layers), default=0) if per_site else len(zoo.expert_names)
    if keep >= most:
        where = "at any site" if per_site else "in the zoo"
        raise ZooError(f"--keep {keep} keeps every expert: there are at most {most} {where}; give a smaller number")
    before = evaluate(zoo, examples, pad_id=pad, batch_size=batch_size, desc="before", progress=progress,
                      per_site=per_site)
    usage = dict(before["expert_share"])
    inputs = site_inputs(zoo, examples, pad_id=pad) if merge else None
    if per_site:
        decided: dict[str, Any] = {"sites": plan_sites(zoo, before["site_share"], keep, merge, inputs)}
        apply_sites(zoo, decided["sites"], before["site_share"])
        decided |= {"kept": list(zoo.expert_names), "dropped": [n for n in usage if n not in zoo.expert_names],
                    "site_share": before["site_share"]}
    else:
        decided = plan(zoo, usage, keep, merge, inputs)
        apply(zoo, decided, usage)
    after = evaluate(zoo, examples, pad_id=pad, batch_size=batch_size, desc="after", progress=progress)
    return {**decided, "usage": usage, "merge": merge, "per_site": per_site, "tokens": before["tokens"],
            "nll_before": before["nll"], "nll_after": after["nll"], "expert_share_after": after["expert_share"]}
