"""Block-level routing of PEFT adapters: at `sites: [mlp]` an adapter on the MLP's projections is one expert of the
block, at `sites: [attn]` one expert of the attention block (one decision per token per block), equal to PEFT when
forced; saving writes a PEFT adapter again."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import expertzoo as ez
from expertzoo.data import Example
from expertzoo.training.fit import fit_router
from helpers import assert_close, fresh, logits, make_adapter, padded, peft_logits, perturb, random_ids

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


# ---------------------------------------------------------------- attention blocks: `sites: [attn]`

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def attn_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("attn_adapters")
    return {"all": make_adapter(root / "all", 2, r=4, lora_alpha=8, target_modules=ATTN),
            "qv": make_adapter(root / "qv", 3, r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"])}  # PEFT's default


def attn_zoo(adapters, router=None, **config):
    model, tok = fresh()
    experts = [{"name": n, "kind": "lora", "from": str(p)} for n, p in adapters.items()]
    return ez.build({"base": "tiny:llama", "sites": ["attn"], "experts": experts,
                     "router": router or {"kind": "learned", "top_k": 2}, **config}, model=model, tokenizer=tok)


def test_adapter_at_attn_is_one_expert_of_the_attention_block_equal_to_peft(attn_adapters, ids):
    zoo = attn_zoo(attn_adapters)
    n_layers = zoo.config.num_hidden_layers
    assert len(zoo.sites) == len(ATTN) * n_layers and len(zoo.routers()) == n_layers  # one router per block
    assert {s.block for s in zoo.sites} == {f"model.layers.{i}.self_attn" for i in range(n_layers)}
    for name, path in attn_adapters.items():
        with zoo.force_expert(name):
            assert_close(logits(zoo, ids), peft_logits(path, ids), atol=1e-5)
    with zoo.force_expert([]):
        assert_close(logits(zoo, ids), logits(fresh()[0], ids), atol=1e-6)


def _adapter_deltas(path, scale):
    """{module path: x -> scale * B A x} of a PEFT adapter, read from its safetensors file."""
    t = load_file(str(path / "adapter_model.safetensors"))
    mods = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in t if k.endswith("lora_A.weight")}
    return {m: (lambda a, b: lambda x: (x @ a.T) @ b.T * scale)(t[f"base_model.model.{m}.lora_A.weight"],
                                                                  t[f"base_model.model.{m}.lora_B.weight"])
            for m in mods}


def test_one_decision_per_token_per_block_applied_at_every_projection(attn_adapters, ids):
    """The routed zoo equals the base with, at each attention projection, every token's delta mixed by the one
    decision its block's router made (traced), computed from the adapters' own tensors."""
    zoo = attn_zoo(attn_adapters)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in zoo.router_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 5.0)
    with zoo.trace() as trace:
        routed = logits(zoo, ids)
    by_block: dict[str, list[dict]] = {}
    for site, record in zip(zoo.sites, trace.records):
        by_block.setdefault(site.block, []).append(record)
    for records in by_block.values():
        assert len(records) == len(ATTN)
        assert all(torch.equal(r["indices"], records[0]["indices"]) and torch.equal(r["weights"], records[0]["weights"])
                   for r in records)
    assert len({tuple(r[0]["weights"][:, 0].tolist()) for r in by_block.values()}) > 1  # routers differ per block
    deltas = [_adapter_deltas(attn_adapters["all"], 8 / 4), _adapter_deltas(attn_adapters["qv"], 6 / 2)]
    model = fresh()[0]

    def mixed(name, record):
        def hook(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])  # [T, d_in]
            add = torch.zeros(x.shape[0], out.shape[-1])
            for slot in range(record["indices"].shape[1]):
                for e, delta in enumerate(deltas):
                    if name in delta:
                        w = record["weights"][:, slot] * (record["indices"][:, slot] == e)  # [T]
                        add += w[:, None] * delta[name](x)
            return out + add.reshape(out.shape)
        return hook

    for site, record in zip(zoo.sites, trace.records):
        model.get_submodule(site.name).register_forward_hook(mixed(site.name, by_block[site.block][0]))
    assert_close(routed, logits(model, ids), atol=1e-5)
    assert (routed - logits(fresh()[0], ids)).abs().max() > 1e-3


def test_attn_block_zoo_saves_loads_and_writes_peft(attn_adapters, ids, tmp_path):
    zoo = attn_zoo(attn_adapters)
    perturb(zoo)
    expected = logits(zoo, ids)
    again = ez.load(zoo.save(tmp_path / "zoo"))
    assert len(again.routers()) == len(zoo.routers())
    assert_close(logits(again, ids), expected, atol=1e-6)
    zoo.save_expert("qv", tmp_path / "qv")
    with zoo.force_expert("qv"):
        assert_close(peft_logits(tmp_path / "qv" / "peft", ids), logits(zoo, ids), atol=1e-5)


def test_adapter_missing_a_whole_attention_block_is_a_clear_error(tmp_path):
    adapter = make_adapter(tmp_path / "l0", 0, r=2, target_modules=["q_proj"], layers_to_transform=[0])
    with pytest.raises(ez.ZooError, match=r"has no LoRA for site model\.layers\.1\.self_attn\.q_proj"):
        attn_zoo({"a": adapter})


@pytest.mark.parametrize("kind", ["centroid", "phatgoose", "arrow"])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fitted_block_routers_at_attn_are_batch_invariant_and_shared(kind, granularity, tmp_path):
    """Routers fitted from data, gates or weights at `sites: [attn]`: one per block, fitted at the block's first site,
    each padded sequence routed as alone, one decision per block, and a save/load round trip."""
    names = ["a", "b"]
    opts = {"steps": 2} if kind == "phatgoose" else {}
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "sites": ["attn"], "experts": [{"name": n, "kind": "lora", "rank": 2} for n in names],
                    "router": {"kind": kind, "granularity": granularity, **opts}}, model=model, tokenizer=tok)
    perturb(zoo)
    data = {n: [Example(ids.tolist(), ids.tolist()) for ids in random_ids(3, 8, seed=20 + i)] for i, n in enumerate(names)}
    fit_router(zoo, None if kind == "arrow" else data)
    assert len(zoo.routers()) == zoo.config.num_hidden_layers and all(bool(r.fitted.all()) for r in zoo.routers())
    seqs = [random_ids(1, n, seed=30 + n)[0] for n in (5, 9, 3)]
    ids, mask = padded(seqs)
    with zoo.trace() as trace:
        batched = logits(zoo, ids, mask)
    for i, s in enumerate(seqs):
        assert_close(batched[i, :len(s)], logits(zoo, s[None]))
    first = {}
    for site, record in zip(zoo.sites, trace.records):
        assert torch.equal(record["weights"], first.setdefault(site.block, record)["weights"])
    assert_close(logits(ez.load(zoo.save(tmp_path / "zoo")), ids, mask), batched, atol=1e-6)
