"""Managing experts: add / remove, parameter groups, aux losses, and ffn experts taken `from:` a fine-tuned
safetensors checkpoint."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import expertzoo
from expertzoo import ZooError
from helpers import assert_close, expert, fresh, logits, make_zoo, perturb, router, routers_taking


def perturb_expert(zoo, name: str, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in zoo.expert_parameters(name):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- add / remove

@pytest.mark.parametrize("kind,router_kind", [(k, r) for k in ("lora", "mlp", "ffn")
                                              for r in routers_taking("lora", "ffn", k)])
def test_add_then_remove_restores_logits(kind, router_kind, ids):
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "ffn")], router_cfg=router(router_kind, ["a", "b"]))
    perturb(zoo)
    original = logits(zoo, ids)
    state = {k: v.clone() for k, v in zoo.zoo_state_dict().items()}
    zoo.add_expert(expert("new", kind))
    assert zoo.expert_names == ["a", "b", "new"]
    assert all(list(layer.experts) == ["a", "b", "new"] for layer in zoo.layers)
    assert all(r.expert_names == ["a", "b", "new"] for r in zoo.routers())
    perturb_expert(zoo, "new")
    if router_kind == "uniform":  # the uniform router mixes every expert: the new one must change the output
        assert (logits(zoo, ids) - original).abs().max() > 1e-4
    zoo.remove_expert("new")
    assert zoo.expert_names == ["a", "b"]
    assert zoo.zoo_state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in zoo.zoo_state_dict().items())
    assert_close(logits(zoo, ids), original, atol=1e-6)


def test_added_expert_is_routed_and_saved(ids, tmp_path):
    zoo = make_zoo(experts=[expert("a", "lora")], router_cfg={"kind": "learned", "top_k": 1})
    zoo.add_expert({"name": "b", "kind": "mlp", "hidden": 8})
    perturb(zoo)
    with zoo.trace() as trace:
        out = logits(zoo, ids)
    assert any((r["indices"] == 1).any() for r in trace.records)
    assert zoo.zoo_config.experts[-1].options.model_dump() == {"hidden": 8, "activation": "silu"}
    zoo.save(tmp_path / "zoo")
    loaded = expertzoo.load(tmp_path / "zoo")
    assert loaded.expert_names == ["a", "b"]
    assert_close(logits(loaded, ids), out, atol=1e-6)


def test_add_expert_to_a_fixed_router_zoo(ids):
    """The fixed router lists only its own experts; adding another must not trip over that list."""
    zoo = make_zoo(experts=[expert("a", "lora")], router_cfg={"kind": "fixed", "experts": ["a"]})
    perturb(zoo)
    before = logits(zoo, ids)
    zoo.add_expert(expert("b", "lora"))
    perturb_expert(zoo, "b")
    assert zoo.expert_names == ["a", "b"]
    assert_close(logits(zoo, ids), before)  # still routed to "a" only
    with zoo.force_expert("b"):
        assert (logits(zoo, ids) - before).abs().max() > 1e-4


def test_add_expert_with_global_router(ids):
    zoo = make_zoo(experts=[expert("a", "lora")], router_cfg={"kind": "learned", "scope": "global",
                                                               "null_experts": 1, "always_on_base": True})
    before = logits(zoo, ids)
    rows = zoo.global_router.weight.shape[0]
    zoo.add_expert(expert("b", "mlp"))
    assert zoo.global_router.weight.shape[0] == rows + 1
    assert_close(logits(zoo, ids), before)  # a fresh residual expert adds nothing


def test_add_duplicate_name_raises():
    zoo = make_zoo(experts=[expert("a", "lora")])
    with pytest.raises(ZooError, match="'a' already exists"):
        zoo.add_expert(expert("a", "mlp"))
    assert zoo.expert_names == ["a"] and all(list(l.experts) == ["a"] for l in zoo.layers)


@pytest.mark.parametrize("spec,match", [({"name": "Bad!", "kind": "lora"}, r"'Bad!'.*\[a-z0-9_-\]\+"),
                                        ({"name": "x", "kind": "dit9"}, "'dit9'"),
                                        ({"name": "x", "kind": "lora", "rnk": 2}, "'rnk'")])
def test_add_bad_spec_raises(spec, match):
    zoo = make_zoo(experts=[expert("a", "lora")])
    with pytest.raises(ZooError, match=match):
        zoo.add_expert(spec)
    assert zoo.expert_names == ["a"]


def test_remove_unknown_and_removed_disabled_expert():
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "lora")])
    with pytest.raises(ZooError, match="no expert named 'c'; this zoo has: a, b"):
        zoo.remove_expert("c")
    zoo.disable_expert("b")
    zoo.remove_expert("b")
    assert zoo.ctx.disabled == set() and zoo.expert_names == ["a"]


# ---------------------------------------------------------------- parameter groups and losses

def test_parameter_groups():
    zoo = make_zoo(sites=["mlp", "attn"], experts=[expert("a", "lora"), expert("b", "mlp")])
    n_sites = len(zoo.sites)
    assert len(zoo.expert_parameters("a")) == 2 * n_sites  # lora_A, lora_B
    assert len(zoo.expert_parameters("b")) == 4 * n_sites  # w_in, w_out with biases
    assert len(zoo.expert_parameters()) == 6 * n_sites
    n_layers = zoo.config.num_hidden_layers
    assert len(zoo.routers()) == 2 * n_layers  # the MLP block's router and the attention block's, per layer
    assert len(zoo.router_parameters()) == 2 * n_layers
    trainable = {id(p) for p in zoo.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in zoo.expert_parameters() + zoo.router_parameters()}
    with pytest.raises(ZooError, match="'c'"):
        zoo.expert_parameters("c")


def test_aux_losses_in_training_only(ids):
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "lora")], router_cfg={"kind": "learned", "null_experts": 1})
    zoo.train()
    zoo(input_ids=ids)
    aux = zoo.aux_losses()
    assert sorted(aux) == ["balance", "z"] and all(torch.isfinite(v) and v.requires_grad for v in aux.values())
    zoo.eval()
    logits(zoo, ids)
    assert zoo.aux_losses() == {}



def test_flops_per_token():
    zoo = make_zoo(experts=[expert("lo", "lora"), expert("ml", "mlp"), expert("ff", "ffn")])
    experts = zoo.layers[0].experts  # llama MLP site: 64 -> 64, intermediate 128
    assert experts["lo"].flops_per_token() == 2 * (4 * 64 + 64 * 4)
    assert experts["ml"].flops_per_token() == 2 * (16 * 64 + 64 * 16)
    assert experts["ff"].flops_per_token() == 2 * 3 * 64 * 128

# ---------------------------------------------------------------- ffn experts from a fine-tuned checkpoint

def fine_tuned(tmp_path, arch: str = "llama", *, part: str = "mlp", layers=(0, 1)):
    """A copy of the tiny base whose `part` weights (in `layers`) are changed, saved as safetensors."""
    model, _ = fresh(arch)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            layer = next((i for i in layers if f".{i}.{part}." in name), None)
            if layer is not None:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(tmp_path / "ft", safe_serialization=True)
    return model, tmp_path / "ft"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ffn_from_checkpoint_equals_fine_tuned_model(arch, tmp_path, ids, base_logits):
    ft_model, ft_dir = fine_tuned(tmp_path, arch)
    expected = logits(ft_model, ids)
    assert (expected - base_logits(arch, ids)).abs().max() > 1e-3
    zoo = make_zoo(arch, experts=[{"name": "ft", "kind": "ffn", "from": str(ft_dir)}],
                   router_cfg={"kind": "fixed", "experts": ["ft"]})
    assert_close(logits(zoo, ids), expected)
    with zoo.force_expert([]):
        assert_close(logits(zoo, ids), base_logits(arch, ids))


def test_ffn_from_checkpoint_in_chosen_layers(tmp_path, ids):
    ft_model, ft_dir = fine_tuned(tmp_path, layers=(1,))
    zoo = make_zoo(layers=[1], experts=[{"name": "ft", "kind": "ffn", "from": str(ft_dir)}],
                   router_cfg={"kind": "fixed", "experts": ["ft"]})
    assert_close(logits(zoo, ids), logits(ft_model, ids))


def test_ffn_from_checkpoint_at_attention_sites(tmp_path, ids):
    ft_model, ft_dir = fine_tuned(tmp_path, part="self_attn")
    zoo = make_zoo(sites=["attn"], experts=[{"name": "ft", "kind": "ffn", "from": str(ft_dir / "model.safetensors")}],
                   router_cfg={"kind": "fixed", "experts": ["ft"]})
    assert_close(logits(zoo, ids), logits(ft_model, ids))


def test_ffn_from_checkpoint_survives_save_load_without_the_checkpoint(tmp_path, ids):
    ft_model, ft_dir = fine_tuned(tmp_path)
    zoo = make_zoo(experts=[{"name": "ft", "kind": "ffn", "from": str(ft_dir)}], router_cfg={"kind": "fixed", "experts": ["ft"]})
    zoo.save(tmp_path / "zoo")
    for f in ft_dir.iterdir():
        f.unlink()
    ft_dir.rmdir()
    loaded = expertzoo.load(tmp_path / "zoo")
    meta = json.loads((tmp_path / "zoo" / "zoo.json").read_text())
    assert "from" not in meta["config"]["experts"][0]  # nothing is read from the source again
    record = loaded.provenance["ft"]
    assert (record["name"], record["kind"], record["source"]) == ("ft", "ffn", str(ft_dir))
    assert record == zoo.provenance["ft"] and len(record["sha256"]) == 64
    assert_close(logits(loaded, ids), logits(ft_model, ids))


def test_add_ffn_expert_from_checkpoint(tmp_path, ids):
    ft_model, ft_dir = fine_tuned(tmp_path)
    zoo = make_zoo(experts=[expert("a", "lora")], router_cfg={"kind": "learned", "top_k": 1})
    zoo.add_expert({"name": "ft", "kind": "ffn", "from": str(ft_dir)})
    with zoo.force_expert("ft"):
        assert_close(logits(zoo, ids), logits(ft_model, ids))


def test_add_expert_from_partial_checkpoint_changes_nothing(tmp_path):
    """A checkpoint with only layer 0 fails at layer 1: no layer may keep a half-added expert."""
    model, _ = fresh("llama")
    state = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    zoo = make_zoo(experts=[expert("a", "lora")])
    with pytest.raises(ZooError, match="model.layers.1.mlp"):
        zoo.add_expert({"name": "ft", "kind": "ffn", "from": str(tmp_path)})
    assert zoo.expert_names == ["a"] and all(list(l.experts) == ["a"] for l in zoo.layers)
    assert all(r.expert_names == ["a"] for r in zoo.routers())


def test_build_and_load_give_eval_mode(tmp_path, ids):
    """Like load_base, a built or loaded zoo is ready for inference: no router noise, no aux losses."""
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "lora")],
                   router_cfg={"kind": "learned", "top_k": 1, "noise": 1.0, "jitter": 0.5})
    perturb(zoo)
    assert not zoo.training and not any(m.training for m in zoo.modules())
    with zoo.trace() as trace:
        first, second = logits(zoo, ids), logits(zoo, ids)
    assert torch.equal(first, second) and torch.equal(trace.records[0]["indices"], trace.records[2]["indices"])
    assert zoo.aux_losses() == {}
    zoo.add_expert(expert("c", "mlp"))
    assert not any(m.training for m in zoo.modules())
    zoo.save(tmp_path / "zoo")
    loaded = expertzoo.load(tmp_path / "zoo")
    assert not any(m.training for m in loaded.modules())
    zoo.train()
    zoo.add_expert(expert("d", "mlp"))
    assert all(m.training for m in zoo.modules())


@pytest.mark.parametrize("kind", sorted(expertzoo.EXPERTS.names()))
def test_expert_folder_round_trip(kind, tmp_path):
    """save_expert writes a folder that `{kind, from: DIR}` reads back into an identical expert."""
    zoo = make_zoo(experts=[{"name": "src", "kind": kind}])
    torch.manual_seed(3)
    for p in zoo.expert_parameters("src"):
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 256, (2, 9))
    with zoo.force_expert("src"), torch.no_grad():
        want = zoo(input_ids=ids).logits
    zoo.save_expert("src", tmp_path / "src")
    other = make_zoo(experts=[{"name": "copy", "kind": kind, "from": str(tmp_path / "src")}],
                     router_cfg={"kind": "fixed", "experts": ["copy"]})
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, want)
