"""One parametrised matrix over every registered expert kind x every router kind that routes it x tiny llama / qwen3:
forward shapes, gradients, save/load round trip, and batch invariance (right and left padding). Routers built from
data are fitted (each expert on its own tiny data, arrow from the experts' weights) before anything is checked."""
from __future__ import annotations

import itertools

import pytest
import torch

import expertzoo
from expertzoo import ROUTERS
from expertzoo.data import Example
from expertzoo.training.fit import fit_router, unfitted_experts
from helpers import (EXPERT_KINDS, ROUTER_KINDS, assert_close, expert, logits, make_zoo, padded, perturb, random_ids,
                     router, takes)

ARCHS = ("llama", "qwen3")
COMBOS = [(e, r, a) for e, r, a in itertools.product(EXPERT_KINDS, ROUTER_KINDS, ARCHS) if takes(r, [e])]
COMBO_IDS = [f"{e}-{r}-{a}" for e, r, a in COMBOS]
NAMES = ["e1", "e2", "e3"]
# small fits: a few Adam steps for RND's predictors and PHATGOOSE's gates
FIT_OPTIONS = {"rnd": {"steps": 15, "target_hidden": 16, "predictor_hidden": 8, "out_dim": 4, "batch_size": 64},
               "phatgoose": {"steps": 2, "batch_size": 2},
               # the base fallback (tested in tests/unit/routers/test_rnd_lowrank.py) would send tokens to no expert
               "rnd_lowrank": {"steps": 15, "rank": 8, "batch_size": 64, "fallback": False}}
ROUTING_MODES = {"token": {}, "sequence": {"granularity": "sequence"}, "global": {"scope": "global"},
                 "sequence-global": {"granularity": "sequence", "scope": "global"}}


def matrix_zoo(expert_kind: str, router_kind: str, arch: str, **router_extra):
    """Three experts of one kind at the MLP of both layers; top-2 where the router takes it, so the choice varies
    by token and the weights vary continuously with the router's input."""
    if ROUTERS.get(router_kind).supports_null:
        router_extra.setdefault("top_k", 2)
    zoo = make_zoo(arch, experts=[expert(n, expert_kind) for n in NAMES],
                   router_cfg=router(router_kind, NAMES, **FIT_OPTIONS.get(router_kind, {}), **router_extra))
    perturb(zoo)
    fit_from = ROUTERS.get(router_kind).fit_from
    if fit_from is not None:
        fit_router(zoo, None if fit_from == "weights" else {n: expert_data(i) for i, n in enumerate(NAMES)})
        assert not unfitted_experts(zoo)
    return zoo


def expert_data(i: int) -> list[Example]:
    """Expert i's tiny data: four sequences of bytes from its own quarter of the byte range."""
    ids = torch.randint(64 * i, 64 * (i + 1), (4, 12), generator=torch.Generator().manual_seed(i))
    return [Example(row.tolist(), row.tolist()) for row in ids]


@pytest.mark.parametrize("expert_kind,router_kind,arch", COMBOS, ids=COMBO_IDS)
def test_forward_shapes(expert_kind, router_kind, arch, ids, base_logits):
    zoo = matrix_zoo(expert_kind, router_kind, arch)
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert out.shape == (*ids.shape, zoo.config.vocab_size)
    assert torch.isfinite(out).all()
    assert (out - base_logits(arch, ids)).abs().max() > 1e-4  # perturbed experts are in use
    assert [r["site"] for r in trace.records] == [s.name for s in zoo.sites]
    for rec in trace.records:
        assert rec["indices"].shape[0] == ids.numel() and rec["weights"].shape == rec["indices"].shape
        assert rec["indices"].max() < len(NAMES)
        real = rec["indices"] >= 0
        assert torch.allclose((rec["weights"] * real).sum(-1), torch.ones(ids.numel()), atol=1e-6)


@pytest.mark.parametrize("expert_kind,router_kind,arch", COMBOS, ids=COMBO_IDS)
def test_backward_reaches_experts(expert_kind, router_kind, arch, ids):
    zoo = matrix_zoo(expert_kind, router_kind, arch, top_k=len(NAMES)) if ROUTERS.get(router_kind).supports_null \
        else matrix_zoo(expert_kind, router_kind, arch)  # top-3 of 3: every expert sees every token
    zoo.train()
    out = zoo(input_ids=ids, labels=ids)
    out.loss.backward()
    params = zoo.expert_parameters()
    assert params and all(p.requires_grad for p in params)
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert any(p.grad.abs().sum() > 0 for p in params)
    for name in NAMES:
        assert any(p.grad.abs().sum() > 0 for p in zoo.expert_parameters(name)), f"expert {name} got no gradient"
    for p in zoo.router_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in zoo.model.get_input_embeddings().parameters())  # the base stays frozen
    for value in zoo.aux_losses().values():
        assert torch.isfinite(value)


@pytest.mark.parametrize("expert_kind,router_kind,arch", COMBOS, ids=COMBO_IDS)
def test_save_load_round_trip(expert_kind, router_kind, arch, ids, tmp_path):
    zoo = matrix_zoo(expert_kind, router_kind, arch)
    before = logits(zoo, ids)
    zoo.save(tmp_path / "zoo")
    loaded = expertzoo.load(tmp_path / "zoo")  # the base comes from the config's `base: tiny:<arch>`
    assert loaded.zoo_config.to_dict() == zoo.zoo_config.to_dict()
    assert loaded.expert_names == NAMES
    saved = zoo.zoo_state_dict()
    assert saved.keys() == loaded.zoo_state_dict().keys()
    for key, t in loaded.zoo_state_dict().items():
        assert torch.equal(t, saved[key]), key
    assert_close(logits(loaded, ids), before, atol=1e-6)


def _alone_and_batched(zoo, left: bool, lengths=(5, 9, 3)):
    seqs = [random_ids(1, n, seed=10 + n)[0] for n in lengths]
    alone = [logits(zoo, s[None])[0] for s in seqs]
    ids, mask = padded(seqs, left=left)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens keep positions 0..n-1
    batched = logits(zoo, ids, mask, position_ids=position_ids)
    width = ids.shape[1]
    return [(a, batched[i, width - len(s):] if left else batched[i, :len(s)]) for i, (a, s) in enumerate(zip(alone, seqs))]


@pytest.mark.parametrize("mode", list(ROUTING_MODES))
@pytest.mark.parametrize("expert_kind,router_kind,arch", COMBOS, ids=COMBO_IDS)
def test_batch_invariance_right_padding(expert_kind, router_kind, arch, mode):
    zoo = matrix_zoo(expert_kind, router_kind, arch, **ROUTING_MODES[mode])
    for alone, batched in _alone_and_batched(zoo, left=False):
        assert_close(batched, alone)


@pytest.mark.parametrize("mode", ["sequence", "sequence-global"])
@pytest.mark.parametrize("expert_kind,router_kind,arch", COMBOS, ids=COMBO_IDS)
def test_batch_invariance_left_padding(expert_kind, router_kind, arch, mode):
    zoo = matrix_zoo(expert_kind, router_kind, arch, **ROUTING_MODES[mode])
    for alone, batched in _alone_and_batched(zoo, left=True):
        assert_close(batched, alone)


def test_sequence_granularity_routes_by_prefix_mean():
    """Sequence routing must differ from token routing (else the invariance tests above prove little)."""
    seq = random_ids(1, 12, seed=3)
    records = {}
    for mode in ("token", "sequence"):
        zoo = matrix_zoo("lora", "learned", "llama", top_k=1, granularity=mode)
        with zoo.trace() as trace:
            logits(zoo, seq)
        records[mode] = trace.records[0]["indices"]
    assert torch.equal(records["token"][0], records["sequence"][0])  # first token: its own mean
    assert not torch.equal(records["token"], records["sequence"])
