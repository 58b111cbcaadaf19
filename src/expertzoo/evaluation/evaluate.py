"""Evaluation: per-dataset mean NLL / perplexity, and routing load, expert shares, FLOPs saved against plain top-k
and (given the dataset's expert) sequence-level routing accuracy, from traces."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import IGNORE, Example, batches
from ..data.hidden import PrefixCache
from ..errors import ZooError
from ..zoo import Zoo


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL and the count of scored tokens.  logits: [B,S,V], labels: [B,S]."""
    target = labels[:, 1:]  # [B,S-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())


class RoutingStats:
    """Accumulates, over real (non-pad) tokens: non-null experts per token per site, and per-expert shares.

    With `site_flops` ({site: FLOPs/token of each expert [E]}) and `top_k`: expert FLOPs run against plain top-k
    (every token at every site running top_k experts of the site's mean cost). With `label` (an expert index):
    sequences whose most-weighted expert, summed over real tokens and sites, is the label.
    """

    def __init__(self, names: list[str], *, site_flops: dict[str, torch.Tensor] | None = None, top_k: int = 0,
                 label: int | None = None):
        self.names = names
        self.slots = torch.zeros(len(names), dtype=torch.float64)  # routed slots per expert
        self.site_slots: dict[str, torch.Tensor] = {}  # the same per site
        self.site_experts: dict[str, list[str]] = {}  # the experts placed at each site
        self.mass = torch.zeros(len(names), dtype=torch.float64)  # routing weight per expert
        self.token_sites = 0
        self.site_flops, self.top_k, self.label = site_flops or {}, top_k, label
        self.flops_run = self.flops_top_k = 0.0
        self.sequences = self.correct = 0

    def add(self, records: list[dict[str, Any]], mask: torch.Tensor) -> None:
        for rec in records:
            idx, w = rec["indices"], rec["weights"]  # [T,k]
            valid = mask.reshape(-1).bool() if mask.numel() == idx.shape[0] else torch.ones(idx.shape[0], dtype=torch.bool)
            idx, w = idx[valid], w[valid]
            real = idx >= 0
            counts = torch.bincount(idx[real], minlength=len(self.names)).double()[: len(self.names)]
            self.slots += counts
            site = rec["site"]
            self.site_slots[site] = self.site_slots.get(site, torch.zeros(len(self.names), dtype=torch.float64)) + counts
            self.site_experts.setdefault(site, list(rec.get("experts", self.names)))
            self.mass += torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, idx[real], w[real].double())
            self.token_sites += idx.shape[0]
            self._add_flops(rec["site"], idx, real)
        if self.label is not None:
            self._add_sequences(records, mask)

    def _add_flops(self, site: str, idx: torch.Tensor, real: torch.Tensor) -> None:
        """idx, real: [T,k] of the real tokens at one site."""
        flops = self.site_flops.get(site)
        if flops is None or not flops.numel():
            return
        self.flops_run += float(flops[idx[real]].sum())
        self.flops_top_k += idx.shape[0] * self.top_k * float(flops.nanmean())  # over the experts at the site

    def _add_sequences(self, records: list[dict[str, Any]], mask: torch.Tensor) -> None:
        """Per sequence of this batch (mask [B,S]): routing weight per expert summed over real tokens and sites."""
        mass = torch.zeros(mask.shape[0], len(self.names), dtype=torch.float64)  # [B,E]
        for rec in records:
            if tuple(rec["shape"]) != tuple(mask.shape):
                continue
            idx = rec["indices"].reshape(*mask.shape, -1)  # [B,S,k]
            w = (rec["weights"].reshape(idx.shape) * (idx >= 0) * mask.unsqueeze(-1).bool()).double()  # [B,S,k]
            mass += (torch.nn.functional.one_hot(idx.clamp(min=0), len(self.names)).double() * w.unsqueeze(-1)).sum((1, 2))
        real = mask.bool().any(-1)  # [B]
        hit = (mass.argmax(-1) == self.label) & (mass.sum(-1) > 0) & real
        self.sequences += int(real.sum())
        self.correct += int(hit.sum())

    def summary(self) -> dict[str, Any]:
        total, mass = float(self.slots.sum()), float(self.mass.sum())
        out = {
            "load": float(self.slots.sum()) / max(self.token_sites, 1),
            "expert_share": {n: float(s) / total if total else 0.0 for n, s in zip(self.names, self.slots)},
            "expert_weight": {n: float(m) / mass if mass else 0.0 for n, m in zip(self.names, self.mass)},
            "flops_saved": 1.0 - self.flops_run / self.flops_top_k if self.flops_top_k else 0.0,
        }
        if self.label is not None:
            out["routing_accuracy"] = self.correct / max(self.sequences, 1)
        return out

    def site_share(self) -> dict[str, dict[str, float]]:
        """Each site's share of routed slots per expert placed there: {site: {expert: share}}."""
        out = {}
        for site, slots in self.site_slots.items():
            total = float(slots.sum())
            out[site] = {n: float(slots[self.names.index(n)]) / total if total else 0.0 for n in self.site_experts[site]}
        return out


def expert_flops(zoo: Zoo) -> dict[str, torch.Tensor]:
    """FLOPs per token of every expert of the zoo at every site: {site: [E] float64}, NaN where it does not sit."""
    return {layer.site.name: torch.tensor([float(layer.experts[n].flops_per_token()) if n in layer.experts
                                           else float("nan") for n in zoo.expert_names], dtype=torch.float64)
            for layer in zoo.layers}


@torch.no_grad()
def evaluate(model: Zoo | torch.nn.Module, examples: list[Example], *, pad_id: int, batch_size: int = 8,
             desc: str = "eval", progress: bool = True, label: str | None = None,
             prefix: PrefixCache | None = None, per_site: bool = False) -> dict[str, Any]:
    """{tokens, nll, ppl, load, expert_share, expert_weight, flops_saved} of `model` on `examples`, and
    `routing_accuracy` when `label` names the expert these examples belong to; `per_site` adds `site_share`
    ({site: {expert placed there: share of the site's routed slots}}). With `prefix` (a PrefixCache of
    `examples` built on this model), the frozen layers below the first site are not run again."""
    is_zoo = isinstance(model, Zoo)
    if label is not None and (not is_zoo or label not in model.expert_names):
        have = ", ".join(model.expert_names) if is_zoo else "none (a base, not a zoo)"
        raise ZooError(f"label {label!r} is not an expert of this model; experts: {have}")
    stats = RoutingStats(model.expert_names, site_flops=expert_flops(model), top_k=model.zoo_config.router.top_k,
                         label=None if label is None else model.expert_names.index(label)) if is_zoo else RoutingStats([])
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(examples) / batch_size)
    source = prefix.batches(examples, batch_size) if prefix is not None else batches(examples, batch_size, pad_id)
    with prefix.running() if prefix is not None else contextlib.nullcontext():
        for batch in tqdm(source, total=n_batches, desc=desc, disable=not progress, leave=False):
            with model.trace() if is_zoo else contextlib.nullcontext() as trace:
                device = next(model.parameters()).device  # batches are built on the CPU
                inputs = {k: batch[k].to(device) for k in ("input_ids", "inputs_embeds") if k in batch}
                logits = model(**inputs, attention_mask=batch["attention_mask"].to(device)).logits
            nll, n = token_nll(logits, batch["labels"].to(device))
            total, count = total + float(nll), count + n
            if trace is not None:
                stats.add(trace.records, batch["attention_mask"])
    model.train(was_training)
    mean = total / max(count, 1)
    extra = {"site_share": stats.site_share()} if per_site and is_zoo else {}
    return {"tokens": count, "nll": mean, "ppl": math.exp(min(mean, 50.0)), **stats.summary(), **extra}
