"""Router rows as mergekit-moe computes its gates, to reproduce a mergekit build (`init: mergekit`,
`mergekit_hidden_avg`, `mergekit_cheap_embed`, `mergekit_random`): the base in bfloat16, prompts prefixed with the BOS
text, left-padded with BOS, and the residual stream *entering* each layer (not the gate's own input, as `init: hidden`
uses); rows per layer are the unit-norm mean over positive prompts minus that over negative prompts."""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import ZooError
from ..io.base_models import load_base
from ..zoo import Zoo, router_sites

Texts = dict[str, tuple[list[str], list[str]]]  # expert -> (positive texts, negative texts)


def _unit(v: torch.Tensor) -> torch.Tensor:  # v: [..., d]
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def _tokenized(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """BOS text + each prompt, no special tokens added, left-padded with BOS (EOS when there is no BOS)."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token
    try:
        return tokenizer([(tokenizer.bos_token or "") + t for t in texts], return_tensors="pt", padding=True,
                         add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad


def _layer_rows(zoo: Zoo, per_layer: Callable[[list[str]], torch.Tensor], texts: Texts) -> list[torch.Tensor]:
    """Per router: [E, d] rows of the layer it sits in, from per_layer(texts) -> [L, d]."""
    rows = []
    for name in zoo.expert_names:
        pos, neg = texts[name]
        v = per_layer(pos)
        rows.append(_unit(v - per_layer(neg)) if neg else _unit(v))
    table = torch.stack(rows, dim=1)  # [L, E, d]
    return [_check(table[layer.site.layer], router, layer) for router, layer in router_sites(zoo)]


def _check(rows: torch.Tensor, router, layer) -> torch.Tensor:
    if router.d_in != rows.shape[1]:
        raise ZooError(f"router init: mergekit gives {rows.shape[1]}-wide rows but site {layer.site.name} routes "
                       f"{router.d_in}-wide inputs; use it at sites fed by the hidden state (sites: [mlp])")
    return rows


def _hidden(average: bool) -> Callable[[Zoo, Texts], list[torch.Tensor]]:
    def rows(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
        model, _ = load_base(zoo.zoo_config.base, dtype=torch.bfloat16)  # the base alone, as mergekit loads it
        _parameters_in_bf16(model)

        @torch.no_grad()
        def per_layer(items: list[str]) -> torch.Tensor:  # [L, d]
            batch = _tokenized(zoo.tokenizer, items)
            states = torch.stack(model(**batch, output_hidden_states=True).hidden_states[:-1])  # [L, B, S, d]
            picked = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]  # [L, B, d]
            return picked.sum(dim=1) / picked.shape[1]
        return _layer_rows(zoo, per_layer, texts)
    return rows


def _parameters_in_bf16(model: torch.nn.Module) -> None:
    """Parameters in bfloat16, buffers left as loaded: what from_pretrained(dtype=bfloat16) gives. (`model.to`
    would also round RoPE's float32 inv_freq to bfloat16 and shift every position's angle: row cosine 0.9997.)"""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)


def _cheap_embed(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
    table = zoo.model.get_input_embeddings().weight.detach().float()  # [V, d]
    n_layers = zoo.model.config.num_hidden_layers

    def per_layer(items: list[str]) -> torch.Tensor:  # [L, d]
        batch = _tokenized(zoo.tokenizer, items)
        h = table[batch["input_ids"]] * batch["attention_mask"].unsqueeze(-1)  # [B, S, d]
        return _unit(h.sum(dim=1).sum(dim=0)).expand(n_layers, -1)  # positions, then prompts: mergekit's order
    return _layer_rows(zoo, per_layer, texts)


def _random(zoo: Zoo, texts: Texts) -> list[torch.Tensor]:
    """Gaussian rows, not normalised, drawn as one [L, E, d] tensor from the config's seed."""
    cfg = zoo.model.config
    g = torch.Generator().manual_seed(zoo.zoo_config.seed)
    table = torch.randn((cfg.num_hidden_layers, len(zoo.expert_names), cfg.hidden_size), generator=g)
    return [_check(table[layer.site.layer], router, layer) for router, layer in router_sites(zoo)]


MERGEKIT_INITS: dict[str, Callable[[Zoo, Texts], list[torch.Tensor]]] = {
    "mergekit": _hidden(average=False), "mergekit_hidden_avg": _hidden(average=True),
    "mergekit_cheap_embed": _cheap_embed, "mergekit_random": _random}
