"""Property tests (hypothesis) of every registered router, called directly on random inputs, fitted or not:
weights non-negative and summing to 1 over the chosen experts (or a row for the base alone), indices valid,
disabled experts never chosen, null slots weightless, deterministic in eval mode, batch-invariant where claimed."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from expertzoo import BASE, NULL, ROUTERS
from expertzoo.nn.routing import RouteInput
from expertzoo.routers.fitted import FittedRouter
from helpers import ROUTER_KINDS

FAST_OPTIONS = {"rnd": {"steps": 15, "target_hidden": 16, "predictor_hidden": 8, "out_dim": 4}}
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


class FakeLora(torch.nn.Module):
    """Just the LoRA weights arrow reads: lora_A [r,d], lora_B [d_out,r]."""

    def __init__(self, d: int, g: torch.Generator):
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.randn(2, d, generator=g))
        self.lora_B = torch.nn.Parameter(torch.randn(d, 2, generator=g))


def make_router(kind: str, d: int, n_experts: int, top_k: int, n_null: int, fitted: bool, seed: int):
    cls = ROUTERS.get(kind)
    names = [f"e{i}" for i in range(n_experts)]
    options = dict(FAST_OPTIONS.get(kind, {}))
    if "experts" in cls.Options.model_fields:
        options["experts"] = names[::2]
    router = cls(d_in=d, experts=names, top_k=top_k, null_experts=n_null if cls.supports_null else 0,
                 always_on_base=False, options=options).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    if fitted and isinstance(router, FittedRouter):
        fit_all(router, names, d, g)
    return router


def fit_all(router: FittedRouter, names: list[str], d: int, g: torch.Generator) -> None:
    for i, name in enumerate(names):
        acts = torch.randn(20, d, generator=g) + i  # each expert its own input distribution
        {"activations": lambda: router.fit(name, acts), "gates": lambda: router.set_gate(name, acts.mean(0)),
         "weights": lambda: router.fit_weights(name, FakeLora(d, g))}[router.fit_from]()


def check_routing(routing, n_tokens: int, n_experts: int, allowed: torch.Tensor) -> None:
    idx, w = routing.indices, routing.weights
    assert idx.shape == w.shape and idx.shape[0] == n_tokens and idx.dtype == torch.long
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert ((idx >= 0) | (idx == NULL) | (idx == BASE)).all() and (idx < n_experts).all()
    assert (w[idx == NULL] == 0).all()  # a null slot carries no weight
    real = idx >= 0
    if real.any():
        assert allowed[idx[real]].all()  # disabled experts are never chosen
    for row_idx, row_w, row_real in zip(idx, w, real):
        chosen = row_idx[row_real].tolist()
        assert len(chosen) == len(set(chosen))  # an expert takes at most one slot of a token
        if row_real.any():
            assert not (row_idx == BASE).any()
            assert abs(float(row_w[row_real].sum()) - 1.0) < 1e-5
        elif (row_idx == BASE).any():  # the base alone: one BASE slot of weight 1
            assert int((row_idx == BASE).sum()) == 1 and abs(float(row_w.sum()) - 1.0) < 1e-6


def draws():
    return dict(d=st.integers(2, 12), n_experts=st.integers(0, 5), n_tokens=st.integers(1, 10),
                top_k=st.integers(1, 4), n_null=st.integers(0, 2), fitted=st.booleans(), seed=st.integers(0, 10_000),
                allowed_bits=st.integers(0, 31))


def allowed_mask(bits: int, n: int) -> torch.Tensor:
    return torch.tensor([bool(bits >> i & 1) or bits == 0 for i in range(n)], dtype=torch.bool)


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@SETTINGS
@given(**draws())
def test_routing_is_valid_and_deterministic(kind, d, n_experts, n_tokens, top_k, n_null, fitted, seed, allowed_bits):
    router = make_router(kind, d, n_experts, top_k, n_null, fitted, seed)
    allowed = allowed_mask(allowed_bits, n_experts)
    h = torch.randn(n_tokens, d, generator=torch.Generator().manual_seed(seed + 1)) * 3
    with torch.no_grad():
        first, second = router(RouteInput(h, allowed)), router(RouteInput(h, allowed))
    check_routing(first, n_tokens, n_experts, allowed)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.weights, second.weights)


@pytest.mark.parametrize("kind", [k for k in ROUTER_KINDS if ROUTERS.get(k).supports_null])
@SETTINGS
@given(n_null=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_null_slots_are_weightless_and_count_as_null(kind, n_null, seed):
    router = make_router(kind, 6, 3, 2, n_null, True, seed)
    h = torch.randn(40, 6, generator=torch.Generator().manual_seed(seed)) * 3
    with torch.no_grad():
        routing = router(RouteInput(h, torch.ones(3, dtype=torch.bool)))
    check_routing(routing, 40, 3, torch.ones(3, dtype=torch.bool))
    null = routing.indices == NULL
    assert (routing.weights[null] == 0).all()
    with torch.no_grad():  # nothing allowed but null slots: every slot null, nothing weighs
        only_null = router(RouteInput(h, torch.zeros(3, dtype=torch.bool)))
    assert (only_null.indices == NULL).all() and (only_null.weights == 0).all()


def split_by_sequence(router, h: torch.Tensor, lengths: list[int], allowed: torch.Tensor):
    """Route the sequences alone and together (right-padded to one batch); (alone, together) per sequence."""
    width = max(lengths)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    batch = torch.zeros(len(lengths), width, h.shape[1])
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        batch[i, :n], mask[i, :n] = h[s:s + n], True
    with torch.no_grad():
        together = router(RouteInput(batch.reshape(-1, h.shape[1]), allowed, seq_mask=mask))
        out = []
        for i, (s, n) in enumerate(zip(starts, lengths)):
            alone = router(RouteInput(h[s:s + n], allowed, seq_mask=torch.ones(1, n, dtype=torch.bool)))
            rows = slice(i * width, i * width + n)
            out.append((alone, together.indices[rows], together.weights[rows]))
    return out


@pytest.mark.parametrize("kind", ROUTER_KINDS)
@SETTINGS
@given(seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 6), min_size=2, max_size=4))
def test_batch_invariant_where_claimed(kind, seed, lengths):
    router = make_router(kind, 5, 3, 2, 1, True, seed)
    if not router.batch_invariant:
        pytest.skip(f"router kind {kind!r} does not claim batch invariance in this mode")
    h = torch.randn(sum(lengths), 5, generator=torch.Generator().manual_seed(seed)) * 3
    allowed = torch.ones(3, dtype=torch.bool)
    for alone, idx, w in split_by_sequence(router, h, lengths, allowed):
        assert torch.equal(alone.indices, idx)
        assert torch.allclose(alone.weights, w, atol=1e-5)


def test_expert_choice_batch_mode_depends_on_batch_mates():
    """The one kind that does not claim invariance in batch mode really is batch-dependent there."""
    router = ROUTERS.get("expert_choice")(d_in=5, experts=["a", "b", "c"], top_k=2, null_experts=0,
                                          always_on_base=False, options={"per_sequence": False, "capacity_factor": 1.0})
    assert router.batch_invariant is False
    with torch.no_grad():
        router.weight.copy_(torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 3)
    h = torch.randn(12, 5, generator=torch.Generator().manual_seed(1)) * 3
    pairs = split_by_sequence(router, h, [6, 6], torch.ones(3, dtype=torch.bool))
    assert any(not torch.equal(alone.indices, idx) for alone, idx, _ in pairs)
