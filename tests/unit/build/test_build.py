"""Zoos built from fine-tuned checkpoints: FFN experts read at each site, Branch-Train-Mix averaging of the rest
(saved and reloaded), and clear errors for checkpoints of another architecture or vocabulary."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import expertzoo as ez
from expertzoo.build.assemble import from_models
from helpers import assert_close, fresh, logits


def finetuned(path: Path, seed: int, *, arch: str = "llama", scale: float = 0.05, **changes) -> Path:
    """A 'fine-tuned' copy of a tiny base: every weight perturbed, saved as safetensors with config and tokenizer."""
    model, tok = fresh(arch)
    if changes:
        cfg = model.config
        for k, v in changes.items():
            setattr(cfg, k, v)
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("finetuned")
    return {name: finetuned(root / name, seed) for name, seed in (("code", 1), ("math", 2))}


def _zoo(experts: list[dict], **config) -> ez.Zoo:
    model, tok = fresh()
    return ez.build({"base": "tiny:llama", "experts": experts, "router": {"kind": "learned", "top_k": 1}, **config},
                    model=model, tokenizer=tok)


def test_ffn_experts_hold_each_checkpoints_module(checkpoints):
    zoo = _zoo([{"name": n, "kind": "ffn", "from": str(p)} for n, p in checkpoints.items()], sites=["mlp", "attn"])
    for name, path in checkpoints.items():
        saved = load_file(path / "model.safetensors")
        for layer in zoo.layers:
            for key, t in layer.experts[name].module.state_dict().items():
                assert torch.equal(t, saved[f"{layer.site.name}.{key}"]), (name, layer.site.name, key)
    base = fresh()[0].state_dict()
    assert torch.equal(zoo.model.model.embed_tokens.weight, base["model.embed_tokens.weight"])  # non_expert: base


def test_average_of_one_checkpoint_forced_to_its_expert_is_that_model(checkpoints, ids):
    """non_expert_params: average over a single checkpoint + its FFN experts everywhere == the fine-tuned model."""
    zoo = _zoo([{"name": "code", "kind": "ffn", "from": str(checkpoints["code"])}], sites=["mlp"],
               non_expert_params="average")
    tuned = AutoModelForCausalLM.from_pretrained(checkpoints["code"]).eval()
    with zoo.force_expert("code"):
        assert_close(logits(zoo, ids), logits(tuned, ids), atol=1e-5)


def test_average_of_two_checkpoints_is_saved_and_reloaded(checkpoints, ids, tmp_path):
    zoo = from_models("tiny:llama", {n: str(p) for n, p in checkpoints.items()}, non_expert_params="average")
    parts = [load_file(p / "model.safetensors") for p in checkpoints.values()]
    for key in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"):
        assert_close(zoo.model.get_parameter(key), (parts[0][key] + parts[1][key]) / 2, atol=1e-6)
    assert "model.embed_tokens.weight" in zoo.base_params
    zoo.save(tmp_path / "zoo")
    again = ez.load(tmp_path / "zoo")  # the base comes from `tiny:llama` again: the averages come from the zoo
    assert_close(logits(again, ids), logits(zoo, ids), atol=0.0)
    assert not torch.equal(again.model.model.embed_tokens.weight, fresh()[0].model.embed_tokens.weight)


def test_average_without_checkpoints_is_a_clear_error():
    with pytest.raises(ez.ZooError, match="non_expert_params: average needs"):
        _zoo([{"name": "a", "kind": "lora", "rank": 2}], non_expert_params="average")


@pytest.mark.parametrize("arch,changes,words", [
    ("qwen3", {}, "model_type='qwen3' but the base has 'llama'"),
    ("llama", {"intermediate_size": 96}, "intermediate_size=96"),
    ("llama", {"vocab_size": 300}, "vocabulary of 300 tokens, the base 259"),
])
def test_mismatched_checkpoint_is_a_clear_error(tmp_path, arch, changes, words):
    path = finetuned(tmp_path / "other", 3, arch=arch, **changes)
    with pytest.raises(ez.ZooError, match="checkpoint") as err:
        _zoo([{"name": "x", "kind": "ffn", "from": str(path)}])
    assert words in str(err.value)


def test_vocabulary_mismatch_of_a_bare_safetensors_file(tmp_path):
    """No config.json: the embedding's rows tell the vocabulary."""
    state = {k: v.clone() for k, v in fresh()[0].state_dict().items()}
    state["model.embed_tokens.weight"] = torch.zeros(300, 64)
    save_file(state, tmp_path / "ft.safetensors")
    with pytest.raises(ez.ZooError, match="vocabulary of 300 tokens"):
        _zoo([{"name": "x", "kind": "ffn", "from": str(tmp_path / "ft.safetensors")}])
