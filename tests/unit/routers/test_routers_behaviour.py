"""What each new router kind promises, on tiny zoos: expert choice's batch-mate attack and its per-sequence cure,
SMEAR's merged LoRA, top-p's dynamic k, RND's base fallback, the PHATGOOSE gate hook, the balance-loss annealing,
the evaluation's flops_saved and routing_accuracy, and fitted routers' batch invariance and save/load."""
from __future__ import annotations

import pytest
import torch

import expertzoo
from expertzoo import BASE, ZooError
from expertzoo.data import Example
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.training.fit import fit_router, gates_applied
from expertzoo.nn.routing import RouteInput, Routing, balance_anneal, gated_routing, normalise_selected
from expertzoo.training.train import train_router
from helpers import PAD, assert_close, expert, logits, make_zoo, padded, perturb, random_ids

NAMES = ["a", "b", "c"]


# ---------------------------------------------------------------- expert choice: batch-mates matter unless per sequence

def attacker(zoo, length: int) -> torch.Tensor:
    """A sequence of the byte tokens that each expert's router likes best at the first site: it fills capacity."""
    layer = zoo.layers[0]
    with torch.no_grad():
        emb = zoo.model.get_input_embeddings().weight[:256]  # [256, d]
        probs = torch.softmax(emb @ layer.router.weight.T, dim=-1)  # [256, E], a proxy for the site input
    best = probs.argmax(0)  # [E]: each expert's favourite token
    return best.repeat(length // len(best) + 1)[:length]


@pytest.mark.parametrize("per_sequence", [False, True])
def test_expert_choice_batch_mate_changes_victim_only_in_batch_mode(per_sequence):
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES],
                   router_cfg={"kind": "expert_choice", "capacity_factor": 1.0, "per_sequence": per_sequence})
    perturb(zoo, router_scale=3.0)
    victim = random_ids(1, 12, seed=5)
    alone = logits(zoo, victim)
    with zoo.trace() as alone_trace:
        logits(zoo, victim)
    crowd = torch.stack([victim[0], attacker(zoo, 12)])
    with zoo.trace() as crowd_trace:
        together = logits(zoo, crowd)[:1]
    victim_rows = [r["indices"].reshape(2, 12, -1)[0] for r in crowd_trace.records]
    changed = any(not torch.equal(a["indices"].reshape(12, -1), v) for a, v in zip(alone_trace.records, victim_rows))
    if per_sequence:
        assert not changed
        assert_close(together, alone)
    else:
        assert changed, "the attacker did not take the victim's expert slots"
        assert (together - alone).abs().max() > 1e-3


def test_expert_choice_drops_tokens_to_the_base():
    """Capacity 0.5 per token on average: some tokens get no expert and keep the base output at their slots."""
    zoo = make_zoo(experts=[expert(n, "ffn") for n in NAMES],
                   router_cfg={"kind": "expert_choice", "capacity_factor": 0.5})
    perturb(zoo)
    with zoo.trace() as trace:
        logits(zoo, random_ids(1, 12))
    for rec in trace.records:
        dropped = (rec["indices"] < 0).all(-1)
        assert dropped.any() and (rec["indices"][dropped, 0] == BASE).all()
        assert torch.allclose(rec["weights"][dropped, 0], torch.ones(int(dropped.sum())))


# ---------------------------------------------------------------- smear: merging, not mixing

def test_smear_runs_the_merged_lora():
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": "smear"})
    perturb(zoo)
    layer = zoo.layers[0]
    h = torch.randn(5, layer.site.d_in)
    with torch.no_grad():
        routing = layer.router(RouteInput(h, torch.ones(3, dtype=torch.bool)))
        out = layer.dispatch(h, routing)
        w = routing.weights  # [T,E]
        experts = list(layer.experts.values())
        a = torch.einsum("te,erd->trd", w, torch.stack([e.lora_A for e in experts]))  # [T,r,d]
        b = torch.einsum("te,eor->tor", w, torch.stack([e.lora_B * e.scale for e in experts]))  # [T,d_out,r]
        merged = layer.base_layer(h) + torch.einsum("tor,trd,td->to", b, a, h)
        mixed = layer.base_layer(h) + sum(w[:, i:i + 1] * e(h) for i, e in enumerate(experts))
    assert routing.merge and torch.allclose(w.sum(-1), torch.ones(5))
    assert_close(out, merged, atol=1e-5)
    assert (out - mixed).abs().max() > 1e-4  # a merge of A and B is not the mixture of outputs


def test_smear_refuses_other_experts():
    with pytest.raises(ZooError, match="smear.*'m'.*mlp"):
        expertzoo.build({"base": "tiny:llama", "experts": [{"name": "l", "kind": "lora"}, {"name": "m", "kind": "mlp"}],
                         "router": {"kind": "smear"}})
    with pytest.raises(ZooError, match="smear.*ranks"):
        expertzoo.build({"base": "tiny:llama", "router": {"kind": "smear"},
                         "experts": [{"name": "l", "kind": "lora", "rank": 4}, {"name": "k", "kind": "lora", "rank": 8}]})
    zoo = make_zoo(experts=[expert("l", "lora")], router_cfg={"kind": "smear"})
    zoo.add_expert(expert("m", "mlp"))
    with pytest.raises(ZooError, match="smear.*'m'"):
        logits(zoo, random_ids(1, 4))


# ---------------------------------------------------------------- top-p: dynamic k

def test_top_p_uses_more_experts_for_larger_p(ids):
    loads = {}
    for p in (0.05, 0.6, 1.0):
        zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": "top_p", "p": p, "max_k": 3})
        perturb(zoo, router_scale=0.3)
        with zoo.trace() as trace:
            logits(zoo, ids)
        loads[p] = torch.cat([(r["indices"] >= 0).sum(-1) for r in trace.records]).float()
    assert (loads[0.05] == 1).all() and (loads[1.0] == 3).all()
    assert 1 < loads[0.6].mean() < 3 and loads[0.6].min() >= 1  # the number of experts varies by token


def test_top_p_trains_with_entropy_loss(ids):
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": "top_p"})
    zoo.train()
    zoo(input_ids=ids)
    assert {"balance", "z", "entropy"} <= set(zoo.aux_losses())


# ---------------------------------------------------------------- rnd: unfamiliar tokens go to the base

def test_rnd_sends_unfamiliar_tokens_to_the_base():
    router = expertzoo.ROUTERS.get("rnd")(d_in=8, experts=["a", "b"], top_k=1, null_experts=0, always_on_base=False,
                                          options={"steps": 200})
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(8, generator=g) * 3
    router.fit("a", centre + 0.1 * torch.randn(400, 8, generator=g))
    router.fit("b", -centre + 0.1 * torch.randn(400, 8, generator=g))
    router.eval()
    familiar = torch.cat([centre + 0.1 * torch.randn(20, 8, generator=g), -centre + 0.1 * torch.randn(20, 8, generator=g)])
    odd = torch.randn(20, 8, generator=g) * 3 + torch.flip(centre, [0]) * 2
    with torch.no_grad():
        everyone = torch.ones(2, dtype=torch.bool)
        known, unknown = router(RouteInput(familiar, everyone)), router(RouteInput(odd, everyone))
    assert (known.indices[:20, 0] == 0).float().mean() > 0.9 and (known.indices[20:, 0] == 1).float().mean() > 0.9
    assert (unknown.indices[:, 0] == BASE).float().mean() > 0.8
    assert router.flops_per_token() > 0


# ---------------------------------------------------------------- phatgoose gate hook

def test_gate_scales_the_forced_residual_expert(ids, base_logits):
    """Gate 0: the base; gate 1: the expert as forced; a zero gate vector: sigmoid(0) = one half of the delta."""
    zoo = make_zoo(experts=[expert("a", "lora")], router_cfg={"kind": "phatgoose"})
    perturb(zoo)

    def constant(c: float) -> dict:
        return {l.site.name: (lambda x, c=c: torch.full((x.numel() // x.shape[-1],), c)) for l in zoo.layers}

    out = {}
    with zoo.force_expert("a"):
        full = logits(zoo, ids)
        for c in (0.0, 0.5, 1.0):
            zoo.ctx.gates = constant(c)
            out[c] = logits(zoo, ids)
        zoo.ctx.gates = None
        with gates_applied(zoo, {l.site.name: torch.zeros(l.site.d_in) for l in zoo.layers}):
            zero_vector = logits(zoo, ids)
    assert zoo.ctx.gates is None
    assert_close(out[0.0], base_logits("llama", ids))
    assert_close(out[1.0], full)
    assert_close(zero_vector, out[0.5])
    assert (out[0.5] - full).abs().max() > 1e-4 and (out[0.5] - out[0.0]).abs().max() > 1e-4


def test_gated_routing_mixes_expert_and_base():
    g = torch.tensor([0.25, 0.9])
    r = gated_routing(Routing(weights=torch.ones(2, 1), indices=torch.zeros(2, 1, dtype=torch.long)), g)
    assert r.indices.tolist() == [[0, BASE], [0, BASE]]
    assert torch.allclose(r.weights, torch.tensor([[0.25, 0.75], [0.9, 0.1]]))


def test_normalised_weights_keep_the_gradient_of_one_expert():
    """A token that kept one expert still teaches the router (the normaliser is held constant)."""
    p = torch.tensor([[0.7, 0.2, 0.1]], requires_grad=True)
    w = normalise_selected(p, torch.tensor([[True, False, False]]))
    assert torch.allclose(w, torch.tensor([[1.0, 0.0, 0.0]]))
    w[0, 0].backward()
    assert p.grad[0, 0] > 0


# ---------------------------------------------------------------- balance annealing

def test_balance_anneal_goes_from_tight_to_loose():
    values = [balance_anneal(s, 10, tight=2.0, loose=0.02) for s in range(10)]
    assert values[0] == pytest.approx(2.0) and values[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(values, values[1:]))


def test_train_router_takes_the_schedule():
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES],
                   router_cfg={"kind": "learned", "top_k": 1, "null_experts": 2})
    perturb(zoo, router_scale=0.1)
    seen = []
    data = [Example(list(range(1, 9)), list(range(1, 9)))] * 4

    def schedule(step: int, steps: int) -> float:
        seen.append(step)
        return balance_anneal(step, steps)

    losses = train_router(zoo, data, steps=3, balance_schedule=schedule, progress=False)
    assert len(losses) == 3 and seen == [0, 1, 2]


# ---------------------------------------------------------------- evaluation: flops_saved and routing_accuracy

def examples(n: int = 6) -> list[Example]:
    return [Example(ids.tolist(), ids.tolist()) for ids in random_ids(n, 10, seed=9)]


def test_flops_saved_counts_null_slots():
    plain = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": "learned", "top_k": 2})
    nulls = make_zoo(experts=[expert(n, "lora") for n in NAMES],
                     router_cfg={"kind": "learned", "top_k": 2, "null_experts": 3})
    perturb(plain)
    perturb(nulls)
    a, b = (evaluate(z, examples(), pad_id=PAD, progress=False) for z in (plain, nulls))
    assert a["flops_saved"] == pytest.approx(0.0, abs=1e-9)  # plain top-2 is the reference
    assert 0 < b["flops_saved"] < 1
    assert b["flops_saved"] == pytest.approx(1 - b["load"] / 2)  # same-cost experts: the share of null slots


def test_routing_accuracy_counts_sequences_of_the_label():
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": "fixed", "experts": ["b"]})
    assert evaluate(zoo, examples(), pad_id=PAD, label="b", progress=False)["routing_accuracy"] == 1.0
    assert evaluate(zoo, examples(), pad_id=PAD, label="a", progress=False)["routing_accuracy"] == 0.0
    assert "routing_accuracy" not in evaluate(zoo, examples(), pad_id=PAD, progress=False)
    with pytest.raises(ZooError, match="'zz'"):
        evaluate(zoo, examples(), pad_id=PAD, label="zz", progress=False)


def test_kinds_without_a_base_slot_refuse_always_on_base():
    for kind in ("centroid", "rnd", "phatgoose", "arrow", "top_p", "expert_choice", "smear"):
        with pytest.raises(ZooError, match=f"'{kind}' has no base slot"):
            expertzoo.load_config({"router": {"kind": kind, "always_on_base": True}})


@pytest.mark.parametrize("kind", ["centroid", "rnd", "phatgoose", "arrow"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fitted_routers_are_batch_invariant_and_round_trip(kind, granularity, tmp_path):
    """Fitted (not just uniform-before-fit): a padded batch routes each sequence as alone; save/load keeps it."""
    fast = {"steps": 3} if kind in ("rnd", "phatgoose") else {}
    zoo = make_zoo(experts=[expert(n, "lora") for n in NAMES], router_cfg={"kind": kind, "granularity": granularity, **fast})
    perturb(zoo)
    data = {n: [Example(ids.tolist(), ids.tolist()) for ids in random_ids(3, 8, seed=20 + i)] for i, n in enumerate(NAMES)}
    fit_router(zoo, None if kind == "arrow" else data)
    assert all(bool(r.fitted.all()) for r in zoo.routers())
    seqs = [random_ids(1, n, seed=30 + n)[0] for n in (5, 9, 3)]
    ids, mask = padded(seqs)
    batched = logits(zoo, ids, mask)
    for i, s in enumerate(seqs):
        assert_close(batched[i, :len(s)], logits(zoo, s[None]))
    zoo.save(tmp_path / "zoo")
    assert_close(logits(expertzoo.load(tmp_path / "zoo"), ids, mask), batched, atol=1e-6)
