"""Site discovery on every tiny architecture: MLP blocks, attention projections, single projections, layer
selections, and clear errors for sites or layers that do not exist."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from expertzoo import ZooError, ZooLayer
from expertzoo.io.base_models import TINY_ARCHS
from expertzoo.nn.sites import decoder_layers
from helpers import assert_close, expert, fresh, logits, make_zoo

# per arch: (decoder layer prefix, attention block, its projections, MLP projections (name, d_in, d_out))
LLAMA_LIKE = ("model.layers", "self_attn", ["q_proj", "k_proj", "v_proj", "o_proj"],
              [("gate_proj", 64, 128), ("up_proj", 64, 128), ("down_proj", 128, 64)])
LAYOUT = {arch: LLAMA_LIKE for arch in TINY_ARCHS}
LAYOUT["gpt2"] = ("transformer.h", "attn", ["c_attn", "c_proj"], [("c_fc", 64, 256), ("c_proj", 256, 64)])


def site_names(zoo) -> list[str]:
    return [s.name for s in zoo.sites]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mlp_sites(arch, ids, base_logits):
    prefix = LAYOUT[arch][0]
    zoo = make_zoo(arch, sites=["mlp"], experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    assert site_names(zoo) == [f"{prefix}.0.mlp", f"{prefix}.1.mlp"]
    assert [(s.layer, s.local, s.d_in, s.d_out) for s in zoo.sites] == [(0, "mlp", 64, 64), (1, "mlp", 64, 64)]
    for site in zoo.sites:  # the ZooLayer sits where the MLP was, the MLP is its base_layer
        layer = zoo.model.get_submodule(site.name)
        assert isinstance(layer, ZooLayer) and layer.base_layer is site.module
    assert_close(logits(zoo, ids), base_logits(arch, ids))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_attn_sites_are_every_attention_projection(arch, ids, base_logits):
    prefix, attn, projections, _ = LAYOUT[arch]
    zoo = make_zoo(arch, sites=["attn"], experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    assert site_names(zoo) == [f"{prefix}.{i}.{attn}.{p}" for i in (0, 1) for p in projections]
    assert all(isinstance(s.module, nn.Module) and s.d_in > 0 and s.d_out > 0 for s in zoo.sites)
    assert_close(logits(zoo, ids), base_logits(arch, ids))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mlp_and_attn_sites_in_forward_order(arch, ids, base_logits):
    prefix, attn, projections, _ = LAYOUT[arch]
    zoo = make_zoo(arch, sites=["mlp", "attn"], experts=[expert("copy", "ffn"), expert("lo", "lora")],
                   router_cfg={"kind": "learned", "top_k": 2})
    per_layer = [f"{attn}.{p}" for p in projections] + ["mlp"]
    assert site_names(zoo) == [f"{prefix}.{i}.{local}" for i in (0, 1) for local in per_layer]
    assert len(zoo.layers) == len(zoo.sites)
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert [r["site"] for r in trace.records] == site_names(zoo)  # the order a forward pass meets them
    assert_close(out, base_logits(arch, ids))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mlp_projection_sites(arch, ids, base_logits):
    prefix, _, _, mlp_projections = LAYOUT[arch]
    sites = [f"mlp.{name}" for name, _, _ in mlp_projections]
    zoo = make_zoo(arch, sites=sites, experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    assert [(s.name, s.d_in, s.d_out) for s in zoo.sites] == \
        [(f"{prefix}.{i}.mlp.{name}", d_in, d_out) for i in (0, 1) for name, d_in, d_out in mlp_projections]
    assert_close(logits(zoo, ids), base_logits(arch, ids))


def test_attn_alias_for_one_projection():
    zoo = make_zoo(sites=["attn.o_proj"])
    assert site_names(zoo) == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    zoo = make_zoo(sites=["self_attn.q_proj"])
    assert site_names(zoo) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("layers,expected", [
    ("all", [0, 1]), ([0], [0]), ([1], [1]), ("1-1", [1]), ("0,1", [0, 1]), ("0-1", [0, 1]), ([1, 0, 1], [0, 1]),
])
def test_layer_selection(layers, expected, ids, base_logits):
    zoo = make_zoo(layers=layers, experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    assert [s.layer for s in zoo.sites] == expected
    assert site_names(zoo) == [f"model.layers.{i}.mlp" for i in expected]
    untouched = [i for i in (0, 1) if i not in expected]
    for i in untouched:
        assert not isinstance(zoo.model.model.layers[i].mlp, ZooLayer)
    assert_close(logits(zoo, ids), base_logits("llama", ids))


@pytest.mark.parametrize("site", ["mlp.nope", "feed_forward", "attn.q_proj_x", "lm_head"])
def test_unknown_site_names_it(site):
    with pytest.raises(ZooError, match=f"unknown site '{site}'.*choose from: mlp, attn"):
        make_zoo(sites=[site])


def test_llama_projection_unknown_on_gpt2():
    with pytest.raises(ZooError, match="unknown site 'mlp.gate_proj'.*mlp.c_fc"):
        make_zoo("gpt2", sites=["mlp.gate_proj"])


@pytest.mark.parametrize("layers,bad", [([2], "layer 2"), ([0, 7], "layer 7"), ("0-3", "layer 2"), ("5", "layer 5")])
def test_out_of_range_layer_names_it(layers, bad):
    with pytest.raises(ZooError, match=f"{bad} does not exist.*layers 0-1"):
        make_zoo(layers=layers)


def test_block_and_its_projection_together_is_refused():
    with pytest.raises(ZooError, match="'model.layers.0.mlp' contains other chosen sites"):
        make_zoo(sites=["mlp", "mlp.down_proj"])


def test_build_leaves_base_weights_frozen_and_untouched():
    model, tok = fresh("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    zoo = make_zoo(sites=["mlp", "attn"], experts=[expert("a", "lora")])
    after = {k.replace(".base_layer", ""): v for k, v in zoo.model.state_dict().items()
             if ".experts." not in k and ".router." not in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(p.requires_grad for n, p in zoo.model.named_parameters() if ".experts." not in n and ".router." not in n)


def test_decoder_layers_found_on_every_arch():
    for arch in TINY_ARCHS:
        prefix, stack = decoder_layers(fresh(arch)[0])
        assert prefix == LAYOUT[arch][0] and len(stack) == 2

