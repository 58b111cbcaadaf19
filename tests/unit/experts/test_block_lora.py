"""Block-level routing of PEFT adapters: at `sites: [mlp]` an adapter on the MLP's projections is one expert of the
block (one decision per token per block), equal to PEFT when forced; saving writes a PEFT adapter again."""
from __future__ import annotations

import pytest

import expertzoo as ez
from helpers import assert_close, fresh, logits, make_adapter, peft_logits, perturb

MLP = ["gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def mlp_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlp_adapters")
    return {"code": make_adapter(root / "code", 0, r=4, lora_alpha=8, target_modules=MLP),
            "math": make_adapter(root / "math", 1, r=2, lora_alpha=4, use_rslora=True, target_modules=MLP,
                                 rank_pattern={"up_proj": 3})}


def block_zoo(adapters, router=None):
    model, tok = fresh()
    experts = [{"name": n, "kind": "lora", "from": str(p)} for n, p in adapters.items()]
    return ez.build({"base": "tiny:llama", "sites": ["mlp"], "experts": experts,
                     "router": router or {"kind": "learned", "top_k": 1}}, model=model, tokenizer=tok)


def test_adapter_at_mlp_is_one_block_expert_equal_to_peft(mlp_adapters, ids):
    zoo = block_zoo(mlp_adapters)
    assert [e.kind for e in zoo.zoo_config.experts] == ["block_lora", "block_lora"]
    assert zoo.zoo_config.experts[0].options.targets == sorted(MLP)
    assert len(zoo.routers()) == zoo.config.num_hidden_layers  # one router per MLP block, not per projection
    for name, path in mlp_adapters.items():
        with zoo.force_expert(name):
            assert_close(logits(zoo, ids), peft_logits(path, ids), atol=1e-5)
    with zoo.force_expert([]):
        assert_close(logits(zoo, ids), logits(fresh()[0], ids), atol=1e-6)


def test_one_decision_per_token_applies_to_every_projection(mlp_adapters, ids):
    zoo = block_zoo(mlp_adapters, {"kind": "learned", "top_k": 1})
    perturb(zoo, router_scale=5.0)
    with zoo.trace() as trace:
        routed = logits(zoo, ids)
    sites = {r["site"] for r in trace.records}
    assert sites == {l.site.name for l in zoo.layers} and all(s.endswith(".mlp") for s in sites)
    assert routed.isfinite().all()


def test_saved_block_expert_is_a_peft_adapter_with_equal_logits(mlp_adapters, ids, tmp_path):
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "sites": ["mlp"], "layers": [1],
                    "experts": [{"name": "b", "kind": "block_lora", "rank": 3, "alpha": 6, "targets": ["up_proj", "down_proj"]}]},
                   model=model, tokenizer=tok)
    perturb(zoo)
    zoo.save_expert("b", tmp_path / "b")
    with zoo.force_expert("b"):
        expected = logits(zoo, ids)
    assert (expected - logits(fresh()[0], ids)).abs().max() > 1e-3
    assert_close(peft_logits(tmp_path / "b" / "peft", ids), expected, atol=1e-5)
    again = ez.build({"base": "tiny:llama", "sites": ["mlp"], "layers": [1],
                      "experts": [{"name": "b", "kind": "lora", "from": str(tmp_path / "b" / "peft")}]},
                     model=fresh()[0], tokenizer=tok)
    with again.force_expert("b"):
        assert_close(logits(again, ids), expected, atol=1e-5)


def test_block_targets_outside_the_block_are_a_clear_error(tmp_path):
    adapter = make_adapter(tmp_path / "attn", 0, r=2, target_modules=["q_proj"])
    with pytest.raises(ez.ZooError, match=r"block_lora targets \['q_proj'\] name no projection.*gate_proj"):
        block_zoo({"a": adapter})
