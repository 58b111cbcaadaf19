"""Generation through the zoo (KV cache on = off, carried sequence means), tracing, and steering with
force_expert / disable_expert / enable_expert."""
from __future__ import annotations

import warnings

import pytest
import torch

from expertzoo import BASE, ZooError
from expertzoo.nn.compat import CACHE_KEYWORDS, cache_keyword, output_cache, past_length
from helpers import assert_close, expert, logits, make_zoo, padded, perturb, random_ids, router, routers_taking

NAMES = ["a", "b", "c"]
MODES = {"token": {}, "sequence": {"granularity": "sequence"}, "global": {"scope": "global"},
         "sequence-global": {"granularity": "sequence", "scope": "global"}}


def steered_zoo(arch: str = "llama", *, router_kind: str = "learned", **router_extra):
    """Three perturbed experts of different kinds; learned top-1 unless told otherwise."""
    if router_kind == "learned":
        router_extra.setdefault("top_k", 1)
    zoo = make_zoo(arch, experts=[expert("a", "lora"), expert("b", "mlp"), expert("c", "ffn")],
                   router_cfg=router(router_kind, NAMES, **router_extra))
    perturb(zoo)
    return zoo


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 6, 4, 2 (generation pads on the left)."""
    return padded([random_ids(1, n, seed=20 + n)[0] for n in (6, 4, 2)], left=True)


def greedy(zoo, ids, mask, use_cache: bool, n: int = 8) -> torch.Tensor:
    return zoo.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, use_cache=use_cache,
                        pad_token_id=256)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("mode", list(MODES))
def test_cache_on_equals_cache_off(arch, mode):
    zoo = steered_zoo(arch, **MODES[mode])
    ids, mask = prompts()
    cached = greedy(zoo, ids, mask, use_cache=True)
    assert cached.shape == (3, ids.shape[1] + 8)
    assert torch.equal(cached, greedy(zoo, ids, mask, use_cache=False))


@pytest.mark.parametrize("mode", ["sequence", "sequence-global"])
def test_batched_generation_equals_alone(mode):
    zoo = steered_zoo(**MODES[mode])
    ids, mask = prompts()
    batched = greedy(zoo, ids, mask, use_cache=True)
    for i in range(3):
        n = int(mask[i].sum())
        alone = greedy(zoo, ids[i:i + 1, -n:], mask[i:i + 1, -n:], use_cache=True)
        assert torch.equal(alone[0, n:], batched[i, ids.shape[1]:])


@pytest.mark.parametrize("mode", ["sequence", "sequence-global"])
def test_sequence_mean_carries_over_decode_steps(mode):
    """One cached decode step routes exactly like the last position of a full forward (top-2: the weights
    follow the prefix mean continuously)."""
    zoo = steered_zoo(top_k=2, **MODES[mode])
    seq = random_ids(1, 10, seed=5)
    with zoo.trace() as full:
        logits(zoo, seq)
    with torch.no_grad():
        cache = output_cache(zoo(input_ids=seq[:, :-1], use_cache=True))
        with zoo.trace() as step:
            out = zoo(input_ids=seq[:, -1:], use_cache=True, **{cache_keyword(zoo.model): cache}).logits
    assert len(step.records) == len(full.records)
    for a, b in zip(full.records, step.records):
        assert a["site"] == b["site"]
        assert torch.equal(a["indices"][-1:], b["indices"])
        assert_close(a["weights"][-1:], b["weights"], atol=1e-6)
    assert_close(out[0, -1], logits(zoo, seq)[0, -1])


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("keyword", CACHE_KEYWORDS)
def test_decode_step_reads_the_cache_under_either_keyword(arch, keyword):
    """A cached decode step continues the sequence mean whichever keyword carries the cache (`cache` from
    transformers 5.24 on, `past_key_values` before and still accepted): it equals the full forward's last token."""
    zoo = steered_zoo(arch, top_k=2, granularity="sequence")
    if keyword == "cache" and cache_keyword(zoo.model) != "cache":
        pytest.skip(f"this transformers release names the cache `{cache_keyword(zoo.model)}`")
    seq = random_ids(1, 10, seed=5)
    with torch.no_grad():
        cache = output_cache(zoo(input_ids=seq[:, :-1], use_cache=True))
        assert past_length({keyword: cache}, 1) == 9
        with warnings.catch_warnings():  # the old name still works, with transformers' own deprecation warning
            warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)
            out = zoo(input_ids=seq[:, -1:], use_cache=True, **{keyword: cache}).logits
    assert_close(out[0, -1], logits(zoo, seq)[0, -1])


def test_past_length_without_a_cache_object():
    """No cache keyword: cache_position, then a mask longer than the new tokens, then position ids imply it."""
    assert past_length({}, 5) == 0
    assert past_length({"cache_position": torch.arange(7, 9)}, 2) == 7
    assert past_length({"attention_mask": torch.ones(2, 12)}, 1) == 11
    assert past_length({"attention_mask": torch.ones(2, 4)}, 4) == 0
    assert past_length({"position_ids": torch.tensor([[6], [4]])}, 1) == 4


def test_unreadable_or_unknown_cache_is_a_clear_error():
    import transformers
    from transformers.cache_utils import DynamicCache

    with pytest.raises(ZooError, match=f"transformers {transformers.__version__}"):
        past_length({"cache": object()}, 1)
    with pytest.raises(ZooError, match="`kv_cache`, a keyword expertzoo does not read"):
        past_length({"kv_cache": DynamicCache()}, 1)


def test_trace_records_every_site_and_forward(ids):
    zoo = steered_zoo()
    with zoo.trace() as trace:
        logits(zoo, ids)
        logits(zoo, ids[:1, :4])
    sites = [s.name for s in zoo.sites]
    assert [r["site"] for r in trace.records] == sites + sites
    assert trace.records[0]["shape"] == tuple(ids.shape) and trace.records[-1]["shape"] == (1, 4)
    for rec in trace.records:
        assert rec["indices"].dtype == torch.long and rec["indices"].shape[1] == 1
        assert ((rec["indices"] >= 0) & (rec["indices"] < len(NAMES))).all()
    seen = torch.cat([r["indices"] for r in trace.records]).unique().tolist()
    assert seen == [0, 1, 2]  # a random router sends tokens to every expert
    logits(zoo, ids)
    assert len(trace.records) == 2 * len(sites)  # nothing recorded after the block


def test_trace_global_scope_records_each_site_with_one_decision(ids):
    zoo = steered_zoo(scope="global")
    with zoo.trace() as trace:
        logits(zoo, ids)
    assert [r["site"] for r in trace.records] == [s.name for s in zoo.sites]
    assert all(torch.equal(r["indices"], trace.records[0]["indices"]) for r in trace.records)


def test_trace_records_generation_steps():
    zoo = steered_zoo()
    ids, mask = prompts()
    with zoo.trace() as trace:
        greedy(zoo, ids, mask, use_cache=True, n=4)
    n_sites = len(zoo.sites)
    assert len(trace.records) == 4 * n_sites  # prefill + 3 decode steps (the last token needs no forward)
    assert trace.records[0]["shape"] == tuple(ids.shape)
    assert all(r["shape"] == (3, 1) for r in trace.records[n_sites:])


@pytest.mark.parametrize("router_kind", routers_taking("lora", "mlp", "ffn"))
@pytest.mark.parametrize("mode", ["token", "global"])
def test_force_expert_context_manager(router_kind, mode, ids):
    zoo = steered_zoo(router_kind=router_kind, **MODES[mode])
    free = logits(zoo, ids)
    with zoo.force_expert("b"), zoo.trace() as trace:
        forced = logits(zoo, ids)
    assert trace.records and all((r["indices"] == NAMES.index("b")).all() for r in trace.records)
    assert all(torch.allclose(r["weights"], torch.ones(1)) for r in trace.records)
    assert_close(logits(zoo, ids), free)  # undone on exit
    only_b = make_zoo(experts=[expert("a", "lora"), expert("b", "mlp"), expert("c", "ffn")],
                      router_cfg={"kind": "fixed", "experts": ["b"]})
    only_b.load_zoo_state_dict({k: v for k, v in zoo.zoo_state_dict().items() if k in only_b.zoo_state_dict()})
    assert_close(forced, logits(only_b, ids))


def test_force_expert_list_base_and_reset(ids, base_logits):
    zoo = steered_zoo()
    free = logits(zoo, ids)
    zoo.force_expert(["a", "c"])  # takes effect without `with`
    with zoo.trace() as trace:
        logits(zoo, ids)
    assert all(r["indices"].tolist() == [[0, 2]] * ids.numel() for r in trace.records)
    assert all(torch.allclose(r["weights"], torch.full((1,), 0.5)) for r in trace.records)
    zoo.force_expert([])  # the base alone
    with zoo.trace() as trace:
        assert_close(logits(zoo, ids), base_logits("llama", ids))
    assert all((r["indices"] == BASE).all() for r in trace.records)
    zoo.force_expert(None)
    assert_close(logits(zoo, ids), free)


def test_force_expert_nested_restores_outer(ids):
    zoo = steered_zoo()
    with zoo.force_expert("a"):
        with zoo.force_expert("c"):
            inner = logits(zoo, ids)
        with zoo.trace() as trace:
            logits(zoo, ids)
    assert all((r["indices"] == 0).all() for r in trace.records)
    with zoo.force_expert("c"):
        assert_close(logits(zoo, ids), inner)


def test_force_unknown_expert_raises():
    zoo = steered_zoo()
    with pytest.raises(ZooError, match="'nope'"):
        zoo.force_expert("nope")
    assert zoo.ctx.forced is None


@pytest.mark.parametrize("router_kind", routers_taking("lora", "mlp", "ffn"))
@pytest.mark.parametrize("mode", ["token", "global"])
def test_disabled_expert_never_routed(router_kind, mode, ids):
    zoo = steered_zoo(router_kind=router_kind, **MODES[mode])
    with zoo.trace() as before:
        free = logits(zoo, ids)
    assert any((r["indices"] == 0).any() for r in before.records)  # "a" is used while enabled
    zoo.disable_expert("a")
    with zoo.trace() as after:
        out = logits(zoo, ids)
    assert after.records and not any((r["indices"] == 0).any() for r in after.records)
    assert (out - free).abs().max() > 1e-4
    zoo.enable_expert("a")
    assert_close(logits(zoo, ids), free)


def test_disabled_expert_not_chosen_in_generation():
    zoo = steered_zoo()
    zoo.disable_expert("c")
    ids, mask = prompts()
    with zoo.trace() as trace:
        greedy(zoo, ids, mask, use_cache=True, n=4)
    assert not any((r["indices"] == 2).any() for r in trace.records)


@pytest.mark.parametrize("kinds,router_kind", [(k, r) for k in (("lora", "mlp", "ffn"), ("ffn", "ffn", "ffn"))
                                                for r in routers_taking(*k)])
def test_disabling_every_expert_gives_the_base(kinds, router_kind, ids, base_logits):
    """No expert left to choose: the base runs (a replace-only site must not drop its block)."""
    zoo = make_zoo(experts=[expert(n, k) for n, k in zip(NAMES, kinds)], router_cfg=router(router_kind, NAMES))
    perturb(zoo)
    for name in NAMES:
        zoo.disable_expert(name)
    assert_close(logits(zoo, ids), base_logits("llama", ids))


def test_disable_unknown_expert_raises():
    zoo = steered_zoo()
    for call in (zoo.disable_expert, zoo.enable_expert):
        with pytest.raises(ZooError, match="'zz'.*a, b, c"):
            call("zz")
