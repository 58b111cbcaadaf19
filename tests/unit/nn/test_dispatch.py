"""Fast dispatch (`nn.dispatch.mix`) against the plain reference path for every expert kind, null and BASE slots,
top-k 1 and 2, each batched-LoRA strategy and gradients; and the shared weight buffers the fast path relies on."""
from __future__ import annotations

import copy

import pytest
import torch

from expertzoo import BASE, NULL, Routing
from expertzoo.experts import ffn as ffn_kind
from expertzoo.experts import lora as lora_kind
from expertzoo.nn import dispatch
from expertzoo.nn.grouped import grouped_mm
from helpers import EXPERT_KINDS, assert_close, expert, make_zoo, perturb


def layer_of(experts: list[dict], site: str = "mlp", top_k: int = 2, seed: int = 0):
    """The first zoo layer of a tiny llama with `experts`, every expert weight perturbed (none is trivially 0)."""
    zoo = make_zoo(sites=[site], experts=experts, router_cfg={"kind": "learned", "top_k": top_k})
    perturb(zoo, seed=seed)
    return zoo, zoo.layers[0]


def random_routing(n_tokens: int, k: int, n_experts: int, *, null: float = 0.0, base: bool = False,
                   seed: int = 0) -> Routing:
    """Distinct experts per token, a share `null` of slots NULL, a BASE slot last when `base`; weights normalised
    over the non-null slots. indices/weights: [T, k (+1)]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(n_tokens)])  # [T,k]
    idx = idx.masked_fill(torch.rand(n_tokens, k, generator=g) < null, NULL)
    if base:
        idx = torch.cat([idx, torch.full((n_tokens, 1), BASE)], dim=1)
    logits = torch.randn(idx.shape, generator=g).masked_fill(idx == NULL, float("-inf"))
    return Routing(weights=torch.softmax(logits, -1).nan_to_num(0.0), indices=idx)


def both(layer, h: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(fast, reference) outputs of one layer's dispatch, without autograd."""
    ref = copy.copy(layer)
    ref.reference_dispatch = True
    with torch.no_grad():
        return layer.dispatch(h, routing), ref.dispatch(h, routing)


CASES = [(kind, k, slots) for kind in EXPERT_KINDS for k in (1, 2) for slots in ("experts", "null", "base")]


@pytest.mark.parametrize("kind,k,slots", CASES, ids=[f"{a}-top{b}-{c}" for a, b, c in CASES])
@pytest.mark.parametrize("n_tokens", [1, 7, 50])
def test_fast_equals_reference(kind, k, slots, n_tokens):
    _, layer = layer_of([expert(f"e{i}", kind) for i in range(3)], top_k=k)
    h = torch.randn(n_tokens, layer.site.d_in)
    routing = random_routing(n_tokens, k, 3, null=0.4 if slots == "null" else 0.0, base=slots == "base", seed=k)
    fast, ref = both(layer, h, routing)
    assert fast.abs().max() > 0
    assert_close(fast, ref, atol=1e-5)


@pytest.mark.parametrize("alphas", [[16.0, 16.0, 16.0], [16.0, 4.0, 1.0]], ids=["one-scale", "scales"])
@pytest.mark.parametrize("n_tokens", [1, 7, 50])
def test_plain_routing_skips_masking_and_equals_reference(alphas, n_tokens):
    """A router's plain decision (every slot an expert, `normalised`: top-k over all experts) takes the LoRA group's
    unmasked path; it must equal the reference, with one shared scale and with per-expert scales."""
    _, layer = layer_of([expert(f"l{i}", "lora", alpha=a) for i, a in enumerate(alphas)], top_k=2)
    h = torch.randn(n_tokens, layer.site.d_in)
    r = random_routing(n_tokens, 2, len(alphas), seed=n_tokens)
    plain = Routing(weights=r.weights, indices=r.indices, may_use_base=False, normalised=True)
    fast, ref = both(layer, h, plain)
    assert fast.abs().max() > 0
    assert_close(fast, ref, atol=1e-5)


@pytest.mark.parametrize("site", ["mlp", "mlp.down_proj", "attn"])
def test_mixed_kinds_and_lora_ranks(site):
    """Two LoRA groups (ranks 4 and 8, different alphas), an MLP and an FFN expert at one site."""
    experts = [expert("a", "lora"), expert("b", "lora", alpha=3.0), expert("c", "lora", rank=8),
               expert("d", "lora", rank=8), expert("m", "mlp"), expert("f", "ffn")]
    zoo, layer = layer_of(experts, site=site, top_k=2)
    for n_tokens, null, base in [(3, 0.0, False), (40, 0.3, True), (200, 0.2, False)]:
        h = torch.randn(n_tokens, layer.site.d_in)
        fast, ref = both(layer, h, random_routing(n_tokens, 2, len(experts), null=null, base=base, seed=n_tokens))
        assert_close(fast, ref, atol=1e-5)


@pytest.mark.parametrize("strategy", ["gathered", "dense", "slices"])
@pytest.mark.parametrize("null,base", [(0.0, False), (0.5, False), (0.3, True)])
def test_each_lora_strategy_equals_reference(strategy, null, base, monkeypatch):
    """Force each batched-LoRA strategy by its thresholds; per-expert scales differ (alphas 16, 4, 1, 16)."""
    monkeypatch.setattr(lora_kind, "LORA_GATHER_MAX_SLOTS", 10**9 if strategy == "gathered" else 0)
    monkeypatch.setattr(lora_kind, "LORA_DENSE_MAX_WASTE", 1e18 if strategy == "dense" else -1.0)
    experts = [expert(f"l{i}", "lora", alpha=a) for i, a in enumerate([16.0, 4.0, 1.0, 16.0])]
    _, layer = layer_of(experts, top_k=2)
    h = torch.randn(33, layer.site.d_in)
    fast, ref = both(layer, h, random_routing(33, 2, 4, null=null, base=base, seed=3))
    assert_close(fast, ref, atol=1e-5)


@pytest.mark.parametrize("kinds", [["lora"] * 3, ["ffn"] * 3, ["lora", "mlp", "ffn"]], ids=["lora", "ffn", "mixed"])
@pytest.mark.parametrize("n_tokens", [4, 70])
def test_gradients_equal_reference(kinds, n_tokens):
    """Training: the same outputs and the same gradients for the input, every expert weight and the router."""
    zoo, layer = layer_of([expert(f"e{i}", kind) for i, kind in enumerate(kinds)], top_k=2)
    ref = copy.copy(layer)
    ref.reference_dispatch = True
    x = torch.randn(1, n_tokens, layer.site.d_in)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = []
    for module in (layer, ref):
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        got = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), [xg, *params])
        grads.append((out.detach(), got))
    assert_close(grads[0][0], grads[1][0], atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):  # sums over many tokens: compare relative to their size
        assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()))
    assert any(g.abs().sum() > 0 for g in grads[0][1][1:])  # the experts and router do get gradients


def test_null_slots_never_reach_an_expert_and_each_expert_runs_once():
    _, layer = layer_of([expert("m0", "mlp"), expert("m1", "mlp"), expert("f", "ffn")], top_k=2)
    seen: dict[str, list[int]] = {n: [] for n in layer.experts}
    for name, e in layer.experts.items():
        e.register_forward_hook(lambda mod, args, out, name=name: seen[name].append(args[0].shape[0]))
    routing = random_routing(64, 2, 3, null=0.5, seed=5)
    with torch.no_grad():
        layer.dispatch(torch.randn(64, layer.site.d_in), routing)
    for i, name in enumerate(layer.experts):
        n_slots = int((routing.indices == i).sum())
        assert seen[name] == ([n_slots] if n_slots else [])


def test_lora_weights_share_one_buffer_and_stay_current():
    """After an inference forward the LoRA experts' A (and B) are slices of one buffer; writes to a weight, by
    any route, are seen by the next forward; a re-pointed weight makes the fast path lay the buffer out again."""
    zoo, layer = layer_of([expert(f"l{i}", "lora") for i in range(4)], top_k=2)
    h = torch.randn(5, layer.site.d_in)
    routing = random_routing(5, 2, 4, seed=1)
    assert_close(*both(layer, h, routing))
    a = [e.lora_A for e in layer.experts.values()]
    step = a[0].numel() * a[0].element_size()
    assert [p.data_ptr() - a[0].data_ptr() for p in a] == [i * step for i in range(4)]
    with torch.no_grad():
        a[2].data.mul_(3.0)  # `.data` writes bump no version counter
        layer.experts["l1"].lora_B.add_(0.5)
    assert_close(*both(layer, h, routing))
    layer.experts["l3"].lora_A.data = torch.randn_like(a[3])
    assert_close(*both(layer, h, routing))
    assert not any(p.grad is not None for p in a) and all(isinstance(p, torch.nn.Parameter) for p in a)


def test_ffn_fast_path_equals_module_and_keeps_saved_format(tmp_path):
    zoo, layer = layer_of([expert("f", "ffn"), expert("g", "ffn")], top_k=1)
    keys = sorted(zoo.zoo_state_dict())
    ffn = layer.experts["f"]
    h = torch.randn(9, layer.site.d_in)
    with torch.no_grad():
        want = ffn.module(h)
        got = ffn(h)  # fused gate/up on the shared [d_in, 2F] buffer
    assert_close(got, want, atol=1e-5)
    m = ffn.module
    assert m.up_proj.weight.data_ptr() - m.gate_proj.weight.data_ptr() == m.gate_proj.weight.shape[0] * 4
    assert sorted(zoo.zoo_state_dict()) == keys
    before = {k: v.clone() for k, v in zoo.zoo_state_dict().items()}
    zoo.save(tmp_path / "z")
    import expertzoo
    from helpers import fresh
    model, tok = fresh()
    again = expertzoo.load(tmp_path / "z", model=model, tokenizer=tok)
    for k, v in again.zoo_state_dict().items():
        assert torch.equal(v, before[k]), k


def test_plan_follows_added_and_removed_experts():
    zoo, layer = layer_of([expert("a", "lora"), expert("b", "lora")], top_k=2)
    h = torch.randn(6, layer.site.d_in)
    assert_close(*both(layer, h, random_routing(6, 2, 2, seed=0)))
    zoo.add_expert(expert("c", "lora"))
    perturb(zoo, seed=4)
    assert_close(*both(layer, h, random_routing(6, 2, 3, seed=1)))
    zoo.remove_expert("a")
    assert_close(*both(layer, h, random_routing(6, 2, 2, seed=2)))


@pytest.mark.parametrize("null,base", [(0.0, False), (0.4, False), (0.3, True)])
@pytest.mark.parametrize("n_tokens", [1, 6, 90])
def test_ffn_padded_batch_equals_reference(null, base, n_tokens, monkeypatch):
    """The GPU path for SwiGLU FFN experts (one padded batch, two bmm), run here on the CPU."""
    monkeypatch.setattr(ffn_kind, "FFN_PADDED_DEVICES", ("cpu",))
    monkeypatch.setattr(ffn_kind, "FFN_PADDED_MAX_PADDING", 10**6)
    called = []
    monkeypatch.setattr(ffn_kind, "ffn_bank", lambda experts, f=ffn_kind.ffn_bank: called.append(1) or f(experts))
    _, layer = layer_of([expert(f"f{i}", "ffn") for i in range(4)], top_k=2)
    h = torch.randn(n_tokens, layer.site.d_in)
    routing = random_routing(n_tokens, 2, 4, null=null, base=base, seed=n_tokens)
    fast, ref = both(layer, h, routing)
    assert_close(fast, ref, atol=1e-5)
    assert bool(called) == (int((routing.indices >= 0).sum()) >= 4)  # fewer slots than experts: one slice each
    with torch.no_grad():  # after a padded batch, the experts share one [E, d, 2F] buffer
        gate_up = [e.fused_weights()[0] for e in layer.experts.values()]
    assert (gate_up[1].data_ptr() - gate_up[0].data_ptr() == gate_up[0].numel() * 4) == bool(called)


def test_strategy_choice_by_device_and_shape():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert lora_kind.lora_strategy(1, 2, 8, 16, 576, 576, cpu) == "gathered"
    assert lora_kind.lora_strategy(64, 2, 8, 16, 576, 576, cpu) == "dense"
    assert lora_kind.lora_strategy(4096, 2, 64, 16, 576, 576, cpu) == "slices"
    assert lora_kind.lora_strategy(256, 2, 64, 16, 576, 576, gpu) == "gathered"
    assert lora_kind.lora_strategy(4096, 2, 64, 16, 576, 576, gpu) == "dense"


@pytest.mark.parametrize("kinds", [["lora"] * 4, ["ffn"] * 4, ["lora", "mlp", "ffn", "dit"]], ids=["lora", "ffn", "mixed"])
@pytest.mark.parametrize("null,base", [(0.0, False), (0.4, False), (0.3, True)])
@pytest.mark.parametrize("n_tokens", [1, 9, 120])
def test_sync_free_dispatch_equals_reference(kinds, null, base, n_tokens, monkeypatch):
    """The path compiled and accelerator forwards take (no host sync: grouped matmuls, gathered / dense LoRA,
    dense singles, base(x) decided by Routing.may_use_base), forced here on the CPU."""
    monkeypatch.setattr(dispatch, "sync_free", lambda x: True)
    monkeypatch.setattr(lora_kind, "LORA_GATHER_MAX_SLOTS", 0)  # LoRA past its gathered size: grouped matmuls
    monkeypatch.setattr(lora_kind, "LORA_DENSE_MAX_WASTE", -1.0)
    _, layer = layer_of([expert(f"e{i}", kind) for i, kind in enumerate(kinds)], top_k=2)
    h = torch.randn(n_tokens, layer.site.d_in)
    fast, ref = both(layer, h, random_routing(n_tokens, 2, 4, null=null, base=base, seed=n_tokens))
    assert_close(fast, ref, atol=1e-5)


def test_grouped_mm_equals_a_loop_and_zeroes_rows_past_the_last_group():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(11, 5, generator=g), torch.randn(3, 5, 4, generator=g)
    ends = torch.tensor([2, 2, 9], dtype=torch.int32)  # an empty group; rows 9-10 belong to none
    got = grouped_mm(x, w, ends)
    want = torch.cat([x[:2] @ w[0], x[2:9] @ w[2], torch.zeros(2, 4)])
    assert_close(got, want, atol=1e-6)
