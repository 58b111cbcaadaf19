"""Router inputs collected by running the zoo with hooks: every token forced to one expert (or to the base), so
what a later site sees never depends on other experts. Routers built from data and router initialisation read them."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..data import Example, batches, evenly, pad_id
from ..zoo import Zoo, router_sites


def router_inputs(x: torch.Tensor, mask: torch.Tensor, granularity: str) -> torch.Tensor:
    """What the router sees in a fresh forward: the token, or the causal mean of its sequence's prefix
    (pads excluded).  x: [B,S,d], mask: [B,S] bool -> [B,S,d] float32."""
    x = x.float()
    if granularity == "token":
        return x
    m = mask.float().unsqueeze(-1)  # [B,S,1]
    return (x * m).cumsum(1) / m.cumsum(1).clamp(min=1.0)


def _pooled(r: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Real tokens [n,d] ("mean") or each sequence's last real token [B,d] ("last") of r [B,S,d]."""
    if pool == "last":
        last = mask.long().cumsum(1).argmax(1)  # [B]: position of the last real token
        return r[torch.arange(r.shape[0]), last][mask.any(1)]
    return r[mask]


@torch.no_grad()
def collect_inputs(zoo: Zoo, examples: list[Example], *, expert: str | None = None, pool: str = "mean",
                   max_tokens: int = 20_000, batch_size: int = 8, progress: bool = False,
                   desc: str = "router inputs") -> list[torch.Tensor]:
    """Router inputs [N,d] of each router (order of `router_sites`) over `examples`; `progress` shows a bar of the
    batches run.

    Every token is forced to `expert` alone at every site (None: the base alone), so the inputs of later sites are
    those the router meets when it routes this data right, and never depend on other experts.
    """
    pairs = router_sites(zoo)
    got: list[list[torch.Tensor]] = [[] for _ in pairs]
    granularity = zoo.zoo_config.router.granularity

    def grab(i: int) -> Callable:
        def hook(module, args):
            x = args[0]  # [B,S,d]
            mask = zoo.ctx.batch_mask(x)
            got[i].append(_pooled(router_inputs(x, mask, granularity), mask, pool).cpu())
        return hook

    handles = [layer.register_forward_pre_hook(grab(i)) for i, (_, layer) in enumerate(pairs)]
    pad = pad_id(zoo.tokenizer)
    was_training = zoo.training
    zoo.eval()
    try:
        with zoo.force_expert([] if expert is None else expert):
            n_batches = -(-len(examples) // batch_size)
            for batch in tqdm(batches(examples, batch_size, pad), total=n_batches, desc=desc, disable=not progress,
                              leave=False):
                zoo(input_ids=batch["input_ids"].to(zoo.device), attention_mask=batch["attention_mask"].to(zoo.device))
    finally:
        for h in handles:
            h.remove()
        zoo.train(was_training)
    return [evenly(torch.cat(parts), max_tokens) for parts in got]
