"""A new expert kind with its own batched path needs only its own file: this one, defined here, registers itself,
says which of its experts stack and runs them together; dispatch groups its slots and calls it, and the zoo's
output equals the one-expert-at-a-time reference path."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from expertzoo import EXPERTS, Expert
from expertzoo.nn.dispatch import Plan
from helpers import assert_close, expert, logits, make_zoo, perturb, random_ids

CALLS: list[int] = []  # group sizes run_stacked was called with


class LinearDelta(Expert):
    """delta(x) = W x, W [d_out, d_in]; same-shape experts run as one einsum over their stacked weights."""

    mode = "residual"

    def __init__(self, *, site, options):
        super().__init__(site=site, options=options)
        self.weight = nn.Parameter(torch.zeros(self.d_out, self.d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, d_in] -> [T, d_out]
        return x @ self.weight.T

    @classmethod
    def stack_key(cls, expert: "LinearDelta") -> tuple:
        return expert.weight.shape, expert.weight.dtype, expert.weight.device

    @classmethod
    def run_stacked(cls, experts, x, slots, out, bank):
        CALLS.append(len(experts))
        weights = bank.get([e.weight for e in experts], lambda: torch.stack([e.weight for e in experts]))  # [E,o,d]
        local = slots.local()  # [T,k]
        coef = torch.where(local >= 0, slots.weights.to(x.dtype), 0.0)  # [T,k]
        gate = torch.zeros(x.shape[0], len(experts), dtype=x.dtype).scatter_add_(1, local.clamp(min=0), coef)  # [T,E]
        return out + torch.einsum("te,eod,td->to", gate, weights, x)


@pytest.fixture
def linear_delta_kind(monkeypatch):
    """The kind registered for one test only."""
    monkeypatch.setattr(EXPERTS, "_items", dict(EXPERTS._items))
    EXPERTS.register("linear_delta")(LinearDelta)
    CALLS.clear()


def test_the_new_kind_runs_stacked_and_equals_the_reference(linear_delta_kind):
    experts = [{"name": f"d{i}", "kind": "linear_delta"} for i in range(3)] + [expert("m", "mlp")]
    zoo = make_zoo(experts=experts, router_cfg={"kind": "learned", "top_k": 2})
    perturb(zoo)
    layer = zoo.layers[0]
    plan = Plan(list(layer.experts.values()))
    assert [(g.kind, g.positions) for g in plan.groups] == [(LinearDelta, [0, 1, 2])] and plan.singles == [3]
    ref = copy.copy(layer)
    ref.reference_dispatch = True
    x = torch.randn(1, 20, layer.site.d_in)
    with torch.no_grad():
        fast, slow = layer(x), ref(x)
    assert CALLS == [3] and fast.abs().max() > 0
    assert_close(fast, slow, atol=1e-5)


def test_the_new_kind_saves_loads_and_routes_in_a_whole_model(linear_delta_kind, tmp_path):
    zoo = make_zoo(experts=[{"name": f"d{i}", "kind": "linear_delta"} for i in range(2)],
                   router_cfg={"kind": "learned", "top_k": 1})
    perturb(zoo)
    ids = random_ids(2, 9)
    before = logits(zoo, ids)
    import expertzoo
    again = expertzoo.load(zoo.save(tmp_path / "z"))
    assert torch.equal(logits(again, ids), before) and len(CALLS) == 2 * len(zoo.layers)
