"""Equivalence first: zoos that must compute exactly what the base computes (all-null, no experts, a copy of the
base FFN, fresh zero-initialised residual experts, always-on base), within 1e-5 on the logits."""
from __future__ import annotations

import pytest
import torch

from expertzoo import NULL, Routing
from helpers import DOWN_PROJ, ROUTER_KINDS, assert_close, expert, logits, make_zoo, perturb, router, routers_taking


# ---------------------------------------------------------------- (a) null experts and empty zoos

def test_no_experts_with_null_slots_equals_base(ids, base_logits):
    zoo = make_zoo(router_cfg={"kind": "learned", "top_k": 1, "null_experts": 2})
    assert_close(logits(zoo, ids), base_logits("llama", ids))


@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_no_experts_equals_base(kind, ids, base_logits):
    zoo = make_zoo(router_cfg=router(kind, []))
    assert_close(logits(zoo, ids), base_logits("llama", ids))


def test_fixed_router_with_no_experts_listed_equals_base(ids, base_logits):
    zoo = make_zoo(experts=[expert("a", "lora"), expert("f", "ffn")], router_cfg={"kind": "fixed", "experts": []})
    perturb(zoo)
    assert_close(logits(zoo, ids), base_logits("llama", ids))


def test_only_null_slots_win_equals_base(ids, base_logits):
    """Trained-looking residual experts, but every expert logit masked: top-1 is always a null slot."""
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "mlp")],
                   router_cfg={"kind": "learned", "top_k": 1, "null_experts": 3})
    perturb(zoo)
    assert (logits(zoo, ids) - base_logits("llama", ids)).abs().max() > 1e-3  # the experts do matter
    zoo.disable_expert("a")
    zoo.disable_expert("b")
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert all((r["indices"] == NULL).all() for r in trace.records)
    assert_close(out, base_logits("llama", ids))


@pytest.mark.parametrize("kind", ["lora", "mlp"])
def test_all_null_routing_at_residual_site_returns_base(kind):
    zoo = make_zoo(experts=[expert("a", kind)], router_cfg={"kind": "learned", "null_experts": 1})
    perturb(zoo)
    layer = zoo.layers[0]
    h = torch.randn(5, layer.site.d_in)
    null = Routing(weights=torch.zeros(5, 2), indices=torch.full((5, 2), NULL))
    with torch.no_grad():
        assert_close(layer.dispatch(h, null), layer.base_layer(h))


def test_all_null_routing_at_replace_site_skips_block():
    """A replace site with every slot null returns 0: the token skips the block (ARCHITECTURE.md)."""
    zoo = make_zoo(experts=[expert("f", "ffn")], router_cfg={"kind": "learned", "null_experts": 1})
    layer = zoo.layers[0]
    h = torch.randn(5, layer.site.d_in)
    null = Routing(weights=torch.zeros(5, 1), indices=torch.full((5, 1), NULL))
    with torch.no_grad():
        assert torch.equal(layer.dispatch(h, null), torch.zeros(5, layer.site.d_out))


# ---------------------------------------------------------------- (b) one replace expert = a copy of the base

SITE_CASES = [(arch, site) for arch in ("llama", "qwen3", "gpt2") for site in ("mlp", "attn", "down_proj")]


@pytest.mark.parametrize("arch,site", SITE_CASES, ids=[f"{a}-{s}" for a, s in SITE_CASES])
def test_ffn_copy_of_base_equals_base(arch, site, ids, base_logits):
    site = DOWN_PROJ.get(arch, "mlp.down_proj") if site == "down_proj" else site
    zoo = make_zoo(arch, sites=[site], experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    assert zoo.layers and all(list(l.experts) == ["copy"] for l in zoo.layers)
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert all((r["indices"] == 0).all() for r in trace.records)  # the copy really ran, not the base
    assert_close(out, base_logits(arch, ids))


@pytest.mark.parametrize("kind", routers_taking("ffn"))
def test_ffn_copy_equals_base_for_every_router(kind, ids, base_logits):
    zoo = make_zoo(experts=[expert("copy", "ffn")], router_cfg=router(kind, ["copy"]))
    assert_close(logits(zoo, ids), base_logits("llama", ids))


def test_two_ffn_copies_weights_sum_to_one(ids, base_logits):
    """Top-2 over two copies of the base: any normalised weights give the base back."""
    zoo = make_zoo(experts=[expert("a", "ffn"), expert("b", "ffn")], router_cfg={"kind": "learned", "top_k": 2})
    perturb(zoo, scale=0.0)  # experts stay copies, router weights become large and random
    assert_close(logits(zoo, ids), base_logits("llama", ids))


def test_perturbed_ffn_changes_logits(ids, base_logits):
    """The equivalence tests above could pass vacuously if the ffn expert never ran; here it must matter."""
    zoo = make_zoo(experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    perturb(zoo)
    assert (logits(zoo, ids) - base_logits("llama", ids)).abs().max() > 1e-3


# ---------------------------------------------------------------- (c) fresh residual experts add nothing

@pytest.mark.parametrize("kind,router_kind", [(k, r) for k in ("lora", "mlp") for r in routers_taking(k)])
def test_fresh_residual_experts_leave_logits(kind, router_kind, ids, base_logits):
    names = ["a", "b"]
    zoo = make_zoo(sites=["mlp", "attn"], experts=[expert(n, kind) for n in names], router_cfg=router(router_kind, names))
    assert_close(logits(zoo, ids), base_logits("llama", ids))


# ---------------------------------------------------------------- (d) always-on base

@pytest.mark.parametrize("null_experts", [0, 2])
def test_always_on_base_with_fresh_residual_experts(null_experts, ids, base_logits):
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "mlp")],
                   router_cfg={"kind": "learned", "top_k": 1, "always_on_base": True, "null_experts": null_experts})
    perturb(zoo, scale=0.0)  # random router, experts still fresh
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert all(r["indices"].shape[1] == 2 and (r["indices"][:, -1] == -2).all() for r in trace.records)
    assert_close(out, base_logits("llama", ids))


def test_always_on_base_with_ffn_copy(ids, base_logits):
    zoo = make_zoo(experts=[expert("copy", "ffn")], router_cfg={"kind": "learned", "always_on_base": True})
    perturb(zoo, scale=0.0)
    assert_close(logits(zoo, ids), base_logits("llama", ids))
