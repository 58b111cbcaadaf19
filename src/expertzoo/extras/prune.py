"""Pruning a zoo (UNCURL; Merge-then-Compress): keep the N experts most used on task data and drop the rest, or,
with merge, fold each dropped expert into the kept expert of the same kind and shape whose outputs on the task's
site inputs are most alike, weighted by routing frequency. Experts are shared by all sites in a zoo, so pruning is
global: an expert's usage is its share of routed slots summed over every site."""
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
def similarity(zoo: Zoo, a: str, b: str, inputs: dict[str, torch.Tensor]) -> float:
    """Mean over sites of the cosine between two experts' outputs (deltas for residual experts) on the same inputs."""
    sims = []
    for layer in zoo.layers:
        x = inputs[layer.site.name].to(next(layer.parameters()).dtype)
        ya, yb = layer.experts[a](x).flatten().float(), layer.experts[b](x).flatten().float()
        sims.append(float(F.cosine_similarity(ya, yb, dim=0)))
    return sum(sims) / len(sims)


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
        for layer in zoo.layers:
            state = merger([layer.experts[n] for n in group], weights)
            layer.experts[target].load_state_dict(state, strict=False)
    for name in decided["dropped"]:
        zoo.remove_expert(name)


def prune(zoo: Zoo, examples: list[Example], *, keep: int, merge: bool = False, batch_size: int = 8,
          progress: bool = True) -> dict[str, Any]:
    """Prune `zoo` in place to `keep` experts by usage on `examples`; returns the report (NLL before and after)."""
    pad = pad_id(zoo.tokenizer)
    if keep >= len(zoo.expert_names):
        raise ZooError(f"--keep {keep} keeps every one of the {len(zoo.expert_names)} experts; give a smaller number")
    before = evaluate(zoo, examples, pad_id=pad, batch_size=batch_size, desc="before", progress=progress)
    usage = dict(before["expert_share"])
    inputs = site_inputs(zoo, examples, pad_id=pad) if merge else None
    decided = plan(zoo, usage, keep, merge, inputs)
    apply(zoo, decided, usage)
    after = evaluate(zoo, examples, pad_id=pad, batch_size=batch_size, desc="after", progress=progress)
    return {**decided, "usage": usage, "merge": merge, "tokens": before["tokens"],
            "nll_before": before["nll"], "nll_after": after["nll"], "expert_share_after": after["expert_share"]}
