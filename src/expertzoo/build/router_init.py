"""Router initialisation without training (mergekit's gate modes), for routers with an `init` option (learned):
each expert's row is the unit-norm mean of its positive prompts' router inputs minus that of its negative prompts
(`hidden`: last token of each prompt, `hidden_avg`: every token), of their token embeddings (`cheap_embed`, one
row for every site), or a random unit vector (`random`). Texts come from the experts' `positive_prompts` /
`negative_prompts` or the router's `init_data`. Router inputs come from `activations.collect_inputs` (base alone).
The `mergekit*` modes reproduce mergekit-moe's gates (mergekit_init.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..config import ZooConfig
from ..data import Example, evenly, read_documents
from ..errors import ZooError
from ..routers.base import InitialisedFromRows
from ..zoo import Zoo, router_sites
from .activations import collect_inputs
from .mergekit_init import MERGEKIT_INITS

UNPROMPTED = ("random", "mergekit_random")  # init modes that need no texts
MAX_TEXTS, MAX_TOKENS = 64, 256  # per expert and side, from init_data: evenly spaced documents, first tokens
Texts = dict[str, tuple[list[str], list[str]]]  # expert -> (positive texts, negative texts)


def check_init(config: ZooConfig) -> None:
    """Every expert has texts when `init` needs them (a clear error before anything heavy is built)."""
    mode, data = getattr(config.router.options, "init", None), getattr(config.router.options, "init_data", None)
    if mode in (None, *UNPROMPTED) or data is not None:
        return
    bare = [e.name for e in config.experts if not e.positive_prompts]
    if bare:
        raise ZooError(f"router init: {mode} needs texts of every expert, but expert {bare[0]!r} has no "
                       "positive_prompts; add `positive_prompts: [...]` to it, or give the router `init_data: DIR`")


def _file_texts(path: str | Path) -> list[str]:
    docs = read_documents(path)
    docs = evenly(docs, MAX_TEXTS)
    return [d.get("text") or d["prompt"] + d["completion"] for d in docs]


def _data_file(data: str | dict[str, str], name: str) -> Path:
    if isinstance(data, dict):
        if name not in data:
            raise ZooError(f"router init_data has no file for expert {name!r}; add `{name}: PATH` to it")
        return Path(data[name])
    found = [p for p in (Path(data) / f"{name}.txt", Path(data) / f"{name}.jsonl") if p.is_file()]
    if not found:
        raise ZooError(f"router init_data folder {str(data)!r} has no {name}.txt or {name}.jsonl; add one per expert")
    return found[0]


def expert_texts(config: ZooConfig) -> Texts:
    """(positive, negative) texts of every expert: init_data files when given, else the experts' prompts."""
    data = getattr(config.router.options, "init_data", None)
    if data is None:
        return {e.name: (list(e.positive_prompts), list(e.negative_prompts)) for e in config.experts}
    return {e.name: (_file_texts(_data_file(data, e.name)), list(e.negative_prompts)) for e in config.experts}


def _examples(texts: list[str], tokenizer) -> list[Example]:
    """Prompts as examples, BOS first (no EOS: the last token is the prompt's own), at most MAX_TOKENS each."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for t in texts:
        ids = (bos + tokenizer(t, add_special_tokens=False)["input_ids"])[:MAX_TOKENS]
        if ids:
            out.append(Example(ids, ids))
    return out


def _unit(v: torch.Tensor) -> torch.Tensor:  # v: [..., d]
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _hidden(pool: str) -> Callable[[Zoo, Texts], list[torch.Tensor]]:
    def rows(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
        def mean_inputs(items: list[str]) -> list[torch.Tensor]:  # one [d] per router
            return [a.mean(0) for a in collect_inputs(zoo, _examples(items, zoo.tokenizer), pool=pool)]

        per_expert = []
        for name in zoo.expert_names:
            pos, neg = texts[name]
            vecs = mean_inputs(pos)
            if neg:
                vecs = [p - n for p, n in zip(vecs, mean_inputs(neg))]
            per_expert.append(vecs)
        return [_unit(torch.stack(vs)) for vs in zip(*per_expert)]  # per router: [E_zoo, d]
    return rows


def _cheap_embed(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
    table = zoo.model.get_input_embeddings().weight.detach().float()  # [V, d]

    def mean_embedding(items: list[str]) -> torch.Tensor:  # [d]
        ids = [i for e in _examples(items, zoo.tokenizer) for i in e.input_ids]
        return table[torch.tensor(ids, dtype=torch.long, device=table.device)].mean(0)

    rows = []
    for name in zoo.expert_names:
        pos, neg = texts[name]
        rows.append(mean_embedding(pos) - (mean_embedding(neg) if neg else 0.0))
    rows = _unit(torch.stack(rows))  # [E, d]
    out = []
    for router, layer in router_sites(zoo):
        if router.d_in != rows.shape[1]:
            raise ZooError(f"router init: cheap_embed gives {rows.shape[1]}-wide rows but site {layer.site.name} "
                           f"routes {router.d_in}-wide inputs; use init: hidden there, or sites fed by the hidden state")
        out.append(rows)
    return out


def _random(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(zoo.zoo_config.seed)
    return [_unit(torch.randn(len(zoo.expert_names), r.d_in, generator=g)) for r, _ in router_sites(zoo)]


INITS: dict[str, Callable[[Zoo, Texts], list[torch.Tensor]]] = {
    "hidden": _hidden("last"), "hidden_avg": _hidden("mean"), "cheap_embed": _cheap_embed, "random": _random,
    **MERGEKIT_INITS}


def init_router(zoo: Zoo) -> None:
    """Set the expert rows of every router of the zoo as its `init` option says (nothing when it has none)."""
    mode = getattr(zoo.zoo_config.router.options, "init", None)
    if mode is None or not zoo.expert_names or not zoo.layers:
        return
    rows = INITS[mode](zoo, expert_texts(zoo.zoo_config) if mode not in UNPROMPTED else {})
    router: InitialisedFromRows
    for (router, _), r in zip(router_sites(zoo), rows):  # r: [E_zoo, d]; a site's router takes its experts' rows
        here = torch.tensor([zoo.expert_names.index(n) for n in router.expert_names], dtype=torch.long)
        router.set_expert_rows(r[here].to(zoo.device))
