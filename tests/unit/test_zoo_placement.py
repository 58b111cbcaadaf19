"""Per-expert placement: each expert at its own sites and layers; each site routes over the experts placed there;
global decisions read through the site's index maps; add / remove at new sites; save / load; provenance."""
from __future__ import annotations

import pytest
import torch

import expertzoo
from expertzoo import ZooError
from expertzoo.nn.layer import ZooLayer
from expertzoo.nn.routing import BASE, NULL, Routing
from helpers import ROUTER_KINDS, assert_close, expert, fresh, logits, make_zoo, perturb, random_ids, router

Q = "model.layers.0.self_attn.q_proj"
MLP0, MLP1 = "model.layers.0.mlp", "model.layers.1.mlp"


def mixed(router_cfg=None, **config):
    """lora `a` at layer 1's MLP, mlp `b` at layer 0's q_proj, ffn `c` at the zoo's own sites (every MLP)."""
    return make_zoo(experts=[expert("a", "lora", layers=[1]), expert("b", "mlp", sites=["attn.q_proj"], layers="0"),
                             expert("c", "ffn")], router_cfg=router_cfg or {"kind": "learned", "top_k": 2}, **config)


@pytest.fixture(scope="module")
def ids():
    return random_ids(2, 12)


def test_each_expert_sits_where_its_spec_says_and_other_sites_stay_unwrapped():
    zoo = mixed()
    assert zoo.placement() == {"a": [MLP1], "b": [Q], "c": [MLP0, MLP1]}
    assert [l.site.name for l in zoo.layers] == [Q, MLP0, MLP1]  # module order
    assert {l.site.name: l.router.expert_names for l in zoo.layers} == {Q: ["b"], MLP0: ["c"], MLP1: ["a", "c"]}
    attn = zoo.model.model.layers[0].self_attn
    assert not isinstance(attn.k_proj, ZooLayer) and isinstance(attn.q_proj, ZooLayer)
    assert not zoo.rectangular and make_zoo(experts=[expert("a", "lora")]).rectangular


def test_forcing_an_expert_equals_a_zoo_that_holds_it_alone_at_its_sites(ids):
    zoo = mixed()
    perturb(zoo)
    alone = make_zoo(experts=[expert("a", "lora")], layers=[1], router_cfg={"kind": "fixed", "experts": ["a"]})
    alone.layers[0].experts["a"].load_state_dict(zoo.layers_of("a")[0].experts["a"].state_dict())
    with zoo.force_expert("a"):
        assert_close(logits(zoo, ids), logits(alone, ids))
    base, _ = fresh()
    with zoo.force_expert([]):
        assert_close(logits(zoo, ids), logits(base, ids))


def test_disabling_an_expert_only_touches_the_sites_where_it_sits(ids):
    zoo = mixed()
    perturb(zoo)
    zoo.disable_expert("b")
    with zoo.trace() as t:
        zoo(input_ids=ids)
    at_q = next(r for r in t.records if r["site"] == Q)
    assert at_q["experts"] == ["b"] and bool((at_q["indices"] == BASE).all() | (at_q["indices"] == NULL).all())


def test_trace_records_zoo_indices_and_each_sites_experts(ids):
    zoo = mixed()
    perturb(zoo)
    with zoo.trace() as t:
        zoo(input_ids=ids)
    by_site = {r["site"]: r for r in t.records}
    assert by_site[MLP0]["experts"] == ["c"] and set(by_site[MLP0]["indices"].unique().tolist()) <= {2, NULL}
    assert set(by_site[Q]["indices"].unique().tolist()) <= {1, NULL}
    assert set(by_site[MLP1]["indices"].unique().tolist()) <= {0, 2}


def test_global_decision_drops_absent_experts_and_renormalises():
    zoo = mixed(router_cfg={"kind": "learned", "top_k": 2, "scope": "global"})
    layer = next(l for l in zoo.layers if l.site.name == MLP0)  # only c (zoo index 2) sits here
    idx = torch.tensor([[0, 2], [1, 0], [2, 1]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1]])
    got = layer.localise(Routing(weights=w, indices=idx))
    assert got.indices.tolist() == [[NULL, 0], [NULL, NULL], [0, NULL]]
    assert_close(got.weights, torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]))


def test_global_scope_routes_once_over_every_expert_and_each_site_reads_its_own(ids):
    zoo = mixed(router_cfg={"kind": "learned", "top_k": 2, "scope": "global"})
    perturb(zoo)
    assert zoo.global_router.expert_names == ["a", "b", "c"]
    with zoo.trace() as t:
        out = logits(zoo, ids)
    assert torch.isfinite(out).all()
    by_site = {r["site"]: r for r in t.records}
    for site, here in ((Q, {1}), (MLP0, {2}), (MLP1, {0, 2})):
        real = by_site[site]["indices"][by_site[site]["weights"] > 0]
        assert set(real.unique().tolist()) <= here
        sums = by_site[site]["weights"].sum(-1)
        assert bool(((sums - 1).abs() < 1e-5).logical_or(sums == 0).all())  # renormalised, or base alone


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_save_load_round_trips_identical_logits(tmp_path, ids, scope):
    zoo = mixed(router_cfg={"kind": "learned", "top_k": 2, "scope": scope})
    perturb(zoo)
    zoo.save(tmp_path / "zoo")
    model, tok = fresh()
    loaded = expertzoo.load(tmp_path / "zoo", model=model, tokenizer=tok)
    assert loaded.placement() == zoo.placement()
    assert torch.equal(logits(loaded, ids), logits(zoo, ids))


def test_add_expert_at_new_sites_then_remove_gives_back_the_zoo(ids):
    zoo = make_zoo(experts=[expert("a", "lora", layers=[1])], router_cfg={"kind": "learned", "top_k": 1})
    perturb(zoo)
    before = logits(zoo, ids)
    assert [l.site.name for l in zoo.layers] == [MLP1]
    zoo.add_expert(expert("q", "lora", sites=["attn.q_proj"], layers=[0]))
    assert zoo.placement() == {"a": [MLP1], "q": [Q]}
    assert zoo.layers[0].router.expert_names == ["q"]
    assert_close(logits(zoo, ids), before)  # a fresh LoRA adds nothing
    zoo.remove_expert("q")
    assert [l.site.name for l in zoo.layers] == [MLP1]
    assert not isinstance(zoo.model.model.layers[0].self_attn.q_proj, ZooLayer)
    assert torch.equal(logits(zoo, ids), before)


def test_removing_the_last_expert_leaves_the_zoos_own_sites():
    zoo = make_zoo(experts=[expert("a", "lora", layers=[1])])
    zoo.remove_expert("a")
    fresh_zoo = make_zoo()
    assert [l.site.name for l in zoo.layers] == [l.site.name for l in fresh_zoo.layers] == [MLP0, MLP1]
    assert set(zoo.zoo_state_dict()) == set(fresh_zoo.zoo_state_dict())


def test_an_expert_folder_places_the_expert_at_its_own_sites(tmp_path, ids):
    trained = make_zoo(experts=[expert("g", "lora", layers=[1])], router_cfg={"kind": "fixed", "experts": ["g"]})
    perturb(trained)
    trained.save_expert("g", tmp_path / "g")
    zoo = make_zoo(experts=[expert("c", "ffn")], router_cfg={"kind": "learned", "top_k": 1})
    zoo.add_expert({"name": "g", "kind": "lora", "from": str(tmp_path / "g")})
    assert zoo.placement()["g"] == [MLP1]
    assert zoo.zoo_config.experts[-1].layers == [1] and zoo.zoo_config.experts[-1].sites == ["mlp"]
    with zoo.force_expert("g"), trained.force_expert("g"):
        assert_close(logits(zoo, ids), logits(trained, ids))
    record = zoo.provenance["g"]
    assert record["source"] == str(tmp_path / "g") and record["kind"] == "lora"


def test_provenance_hash_follows_the_weights(tmp_path):
    def folder(seed: int):
        z = make_zoo(experts=[expert("g", "lora")], router_cfg={"kind": "fixed", "experts": ["g"]})
        perturb(z, seed=seed)
        return z.save_expert("g", tmp_path / f"g{seed}")

    same = [make_zoo(experts=[{"name": "g", "kind": "lora", "from": str(folder(s))}]).provenance["g"]["sha256"]
            for s in (1, 1, 2)]
    assert same[0] == same[1] != same[2]


def test_block_and_its_projection_in_one_layer_is_refused():
    with pytest.raises(ZooError, match=r"'a' sits at model.layers.0.mlp and 'b' at model.layers.0.mlp.down_proj"):
        make_zoo(experts=[expert("a", "lora", layers=[0]), expert("b", "lora", sites=["mlp.down_proj"], layers=[0])])


@pytest.mark.parametrize("bad, match", [({"layers": [5]}, "expert 'a': layer 5 does not exist"),
                                        ({"sites": []}, "sites \\[\\] is empty"),
                                        ({"layers": "3-1"}, "runs backwards")])
def test_bad_placement_is_one_line_naming_it(bad, match):
    with pytest.raises(ZooError, match=match):
        make_zoo(experts=[expert("a", "lora", **bad)])


def test_centroid_router_fits_each_site_over_its_own_experts(ids):
    from expertzoo.data import Example
    from expertzoo.training.fit import fit_router, unfitted_experts

    zoo = mixed(router_cfg={"kind": "centroid", "top_k": 1})
    data = {n: [Example(ids[i].tolist(), ids[i].tolist()) for i in range(2)] for n in ("a", "b")}
    fit_router(zoo, data)
    fitted = {l.site.name: dict(zip(l.router.expert_names, l.router.fitted.tolist())) for l in zoo.layers}
    assert fitted == {Q: {"b": 1.0}, MLP0: {"c": 0.0}, MLP1: {"a": 1.0, "c": 0.0}}
    assert unfitted_experts(zoo) == ["c"]


def test_remove_expert_at_some_sites_keeps_it_elsewhere_and_round_trips(tmp_path, ids):
    zoo = mixed()
    perturb(zoo)
    zoo.remove_expert_at("c", [MLP0])
    assert zoo.placement() == {"a": [MLP1], "b": [Q], "c": [MLP1]}
    assert not isinstance(zoo.model.model.layers[0].mlp, ZooLayer)  # no expert left there
    assert zoo.zoo_config.experts[2].at == [MLP1]
    zoo.save(tmp_path / "zoo")
    model, tok = fresh()
    loaded = expertzoo.load(tmp_path / "zoo", model=model, tokenizer=tok)
    assert loaded.placement() == zoo.placement()
    assert torch.equal(logits(loaded, ids), logits(zoo, ids))
    with pytest.raises(ZooError, match="does not sit at model.layers.0.mlp"):
        zoo.remove_expert_at("a", [MLP0])
    zoo.remove_expert_at("c", [MLP1])
    assert "c" not in zoo.expert_names


def test_at_outside_the_experts_sites_is_refused():
    with pytest.raises(ZooError, match="`at` names model.layers.0.mlp, which is not among its sites"):
        make_zoo(experts=[expert("a", "lora", layers=[1], at=[MLP0])])


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("kind", ROUTER_KINDS)
def test_every_router_kind_routes_a_mixed_placement(tmp_path, ids, kind, scope, granularity):
    """Two LoRA experts of one rank (every kind takes them): one at layer 0 only, one at both layers."""
    cfg = router(kind, ["a", "b"], top_k=1, scope=scope, granularity=granularity)
    zoo = make_zoo(experts=[expert("a", "lora", layers=[0]), expert("b", "lora")], router_cfg=cfg)
    perturb(zoo, router_scale=0.1)
    with zoo.trace() as t:
        out = logits(zoo, ids)
    assert torch.isfinite(out).all()
    at_1 = [r for r in t.records if r["site"] == MLP1]
    assert at_1 and all(set(r["indices"][r["weights"] > 0].tolist()) <= {1, BASE} for r in at_1)  # never `a`
    zoo.save(tmp_path / "zoo")
    model, tok = fresh()
    assert torch.equal(logits(expertzoo.load(tmp_path / "zoo", model=model, tokenizer=tok), ids), out)
