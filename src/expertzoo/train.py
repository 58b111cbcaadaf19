"""Training loops: an expert (router bypassed, base frozen) or the router (experts frozen), LM loss plus
the router's balancing and z losses. Progress bar with loss; returns the loss curve."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from tqdm.auto import tqdm

from .data import Example, endless_batches
from .evaluate import token_nll
from .zoo import Zoo


@contextlib.contextmanager
def only_training(zoo: Zoo, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for `params` alone while inside; every zoo parameter's flag is restored after."""
    everything = list(zoo.parameters())
    before = [p.requires_grad for p in everything]
    chosen = {id(p) for p in params}
    for p in everything:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in zip(everything, before):
            p.requires_grad_(flag)


def fit(zoo: Zoo, params: list[torch.nn.Parameter], examples: list[Example], *, steps: int, lr: float,
        batch_size: int = 4, balance_weight: float = 0.0, z_weight: float = 0.0, seed: int = 0,
        desc: str = "train", progress: bool = True) -> list[float]:
    """AdamW on `params` for `steps` steps; loss = mean token NLL + weighted router aux losses."""
    if not params:
        raise ValueError("nothing to train: the parameter list is empty")
    torch.manual_seed(seed)
    pad = zoo.tokenizer.pad_token_id if zoo.tokenizer.pad_token_id is not None else zoo.tokenizer.eos_token_id
    data = endless_batches(examples, batch_size, pad, seed)
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    losses: list[float] = []
    zoo.train()
    with only_training(zoo, params), tqdm(range(steps), desc=desc, disable=not progress) as bar:
        for _ in bar:
            batch = next(data)
            logits = zoo(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll_sum, n = token_nll(logits, batch["labels"])
            nll = nll_sum / max(n, 1)
            aux = zoo.aux_losses()
            loss = nll + balance_weight * aux.get("balance", 0.0) + z_weight * aux.get("z", 0.0)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            losses.append(nll.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    zoo.eval()
    return losses


def train_expert(zoo: Zoo, name: str, examples: list[Example], *, steps: int, lr: float = 1e-3, **kw) -> list[float]:
    """Train one expert on its data with every token forced to it; base, router and other experts frozen."""
    with zoo.force_expert(name):
        return fit(zoo, zoo.expert_parameters(name), examples, steps=steps, lr=lr, desc=f"expert {name}", **kw)


def train_router(zoo: Zoo, examples: list[Example], *, steps: int, lr: float = 1e-2, balance_weight: float = 0.01,
                 z_weight: float = 0.001, **kw) -> list[float]:
    """Train the router(s) alone on mixed data with the LM loss plus balancing and z losses."""
    return fit(zoo, zoo.router_parameters(), examples, steps=steps, lr=lr, balance_weight=balance_weight,
               z_weight=z_weight, desc="router", **kw)
