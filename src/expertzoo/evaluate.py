"""Evaluation: per-dataset mean NLL / perplexity, and routing load and expert shares from traces."""
from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE, Example, batches
from .zoo import Zoo


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL and the count of scored tokens.  logits: [B,S,V], labels: [B,S]."""
    target = labels[:, 1:]  # [B,S-1]
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="sum")
    return nll, int((target != IGNORE).sum())


class RoutingStats:
    """Accumulates, over real (non-pad) tokens: non-null experts per token per site, and per-expert shares."""

    def __init__(self, names: list[str]):
        self.names = names
        self.slots = torch.zeros(len(names), dtype=torch.float64)  # routed slots per expert
        self.mass = torch.zeros(len(names), dtype=torch.float64)  # routing weight per expert
        self.token_sites = 0

    def add(self, records: list[dict[str, Any]], mask: torch.Tensor) -> None:
        for rec in records:
            idx, w = rec["indices"], rec["weights"]  # [T,k]
            valid = mask.reshape(-1).bool() if mask.numel() == idx.shape[0] else torch.ones(idx.shape[0], dtype=torch.bool)
            idx, w = idx[valid], w[valid]
            real = idx >= 0
            self.slots += torch.bincount(idx[real], minlength=len(self.names)).double()[: len(self.names)]
            self.mass += torch.zeros(len(self.names), dtype=torch.float64).index_add_(0, idx[real], w[real].double())
            self.token_sites += idx.shape[0]

    def summary(self) -> dict[str, Any]:
        total, mass = float(self.slots.sum()), float(self.mass.sum())
        return {
            "load": float(self.slots.sum()) / max(self.token_sites, 1),
            "expert_share": {n: float(s) / total if total else 0.0 for n, s in zip(self.names, self.slots)},
            "expert_weight": {n: float(m) / mass if mass else 0.0 for n, m in zip(self.names, self.mass)},
        }


@torch.no_grad()
def evaluate(model: Zoo | torch.nn.Module, examples: list[Example], *, pad_id: int, batch_size: int = 8,
             desc: str = "eval", progress: bool = True) -> dict[str, Any]:
    """{tokens, nll, ppl, load, expert_share, expert_weight} of `model` on `examples`."""
    is_zoo = isinstance(model, Zoo)
    stats = RoutingStats(model.expert_names if is_zoo else [])
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    n_batches = math.ceil(len(examples) / batch_size)
    for batch in tqdm(batches(examples, batch_size, pad_id), total=n_batches, desc=desc, disable=not progress, leave=False):
        with model.trace() if is_zoo else contextlib.nullcontext() as trace:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll, n = token_nll(logits, batch["labels"])
        total, count = total + float(nll), count + n
        if trace is not None:
            stats.add(trace.records, batch["attention_mask"])
    model.train(was_training)
    mean = total / max(count, 1)
    return {"tokens": count, "nll": mean, "ppl": math.exp(min(mean, 50.0)), **stats.summary()}
