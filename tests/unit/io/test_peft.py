"""PEFT adapters in and out: lora experts read adapters made with peft itself (ranks, alpha, rslora, rank and
alpha patterns), saved lora experts load in peft.PeftModel with the same logits, merges, and clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.io.peft import building_peft_model
from helpers import assert_close, fresh, logits, make_adapter, peft_logits, perturb

TARGETS = ["q_proj", "v_proj", "down_proj"]
SITES = ["attn.q_proj", "attn.v_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "plain": make_adapter(root / "plain", 0, r=4, lora_alpha=8, target_modules=TARGETS),
        "rslora": make_adapter(root / "rslora", 1, r=2, lora_alpha=4, use_rslora=True, target_modules=TARGETS,
                               rank_pattern={"model.layers.1.mlp.down_proj": 3}, alpha_pattern={"v_proj": 5}),
        "other": make_adapter(root / "other", 2, r=4, lora_alpha=16, target_modules=TARGETS),
    }


def adapter_zoo(adapters: dict[str, Path], names: list[str], router: dict | None = None) -> ez.Zoo:
    model, tok = fresh()
    experts = [{"name": n, "kind": "lora", "from": str(adapters[n])} for n in names]
    return ez.build({"base": "tiny:llama", "sites": SITES, "experts": experts,
                     "router": router or {"kind": "learned", "top_k": 1}}, model=model, tokenizer=tok)


def test_zoo_forced_to_an_adapter_expert_equals_peft(adapters, ids):
    zoo = adapter_zoo(adapters, ["plain", "rslora"])
    assert [e.options.rank for e in zoo.zoo_config.experts] == [4, 3]  # ranks differ; the largest of a pattern
    for name in ("plain", "rslora"):
        with zoo.force_expert(name):
            assert_close(logits(zoo, ids), peft_logits(adapters[name], ids), atol=1e-5)


@pytest.mark.parametrize("arch,sites", [("llama", ["attn.q_proj", "mlp.down_proj"]), ("gpt2", ["mlp.c_fc"])])
def test_saved_lora_expert_loads_in_peft_with_equal_logits(tmp_path, ids, arch, sites):
    model, tok = fresh(arch)
    zoo = ez.build({"base": f"tiny:{arch}", "sites": sites, "layers": [1],
                    "experts": [{"name": "a", "kind": "lora", "rank": 3, "alpha": 5}]}, model=model, tokenizer=tok)
    perturb(zoo)
    zoo.save_expert("a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 5 and cfg["base_model_name_or_path"] == f"tiny:{arch}"
    with zoo.force_expert("a"):
        expected = logits(zoo, ids)
    assert (expected - logits(fresh(arch)[0], ids)).abs().max() > 1e-3  # the expert changes the output
    assert_close(peft_logits(tmp_path / "a" / "peft", ids, arch), expected, atol=1e-5)


def test_merge_cat_equals_a_uniform_zoo_and_eval_reads_it(adapters, ids, tmp_path, capsys):
    """cat with weights 1/2, 1/2 is exactly base + (d1 + d2) / 2, what a uniform router over both experts computes."""
    out = tmp_path / "merged"
    assert main(["merge", "--base", "tiny:llama", "--adapters", str(adapters["plain"]), str(adapters["other"]),
                 "--method", "cat", "-o", str(out)]) == 0
    zoo = adapter_zoo(adapters, ["plain", "other"], {"kind": "uniform"})
    assert_close(peft_logits(out, ids), logits(zoo, ids), atol=1e-5)
    (tmp_path / "d.txt").write_text("hello world\n\nsome more text here", encoding="utf-8")
    assert main(["eval", str(out), "--data", f"d={tmp_path / 'd.txt'}", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["datasets"]["d"]["tokens"] > 0 and report["datasets"]["d"]["nll"] > 0


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_merge_linear_and_ties_write_a_loadable_adapter(adapters, ids, tmp_path, method):
    out = tmp_path / method
    assert main(["merge", "--base", "tiny:llama", "--adapters", str(adapters["plain"]), str(adapters["other"]),
                 "--method", method, "-o", str(out)]) == 0
    merged = peft_logits(out, ids)
    assert (merged - logits(fresh()[0], ids)).abs().max() > 1e-4
    assert json.loads((out / "zoo_merge.json").read_text())["method"] == method


def test_merge_of_different_ranks_says_use_cat(adapters, tmp_path, capsys):
    assert main(["merge", "--base", "tiny:llama", "--adapters", str(adapters["plain"]), str(adapters["rslora"]),
                 "--method", "linear", "-o", str(tmp_path / "m")]) == 2
    assert "--method cat" in capsys.readouterr().err


def test_adapter_missing_a_site_is_a_clear_error(adapters):
    model, tok = fresh()
    with pytest.raises(ez.ZooError, match=r"has no LoRA for site model\.layers\.0\.mlp\.up_proj.*target_modules"):
        ez.build({"base": "tiny:llama", "sites": ["mlp.up_proj"], "experts": [{"name": "a", "kind": "lora",
                  "from": str(adapters["plain"])}]}, model=model, tokenizer=tok)


def test_dora_and_pickled_adapters_are_refused(tmp_path):
    dora = make_adapter(tmp_path / "dora", 0, r=2, target_modules=["q_proj"], use_dora=True)
    model, tok = fresh()
    cfg = {"base": "tiny:llama", "sites": ["attn.q_proj"], "experts": [{"name": "a", "kind": "lora", "from": str(dora)}]}
    with pytest.raises(ez.ZooError, match="DoRA"):
        ez.build(cfg, model=model, tokenizer=tok)
    plain = make_adapter(tmp_path / "plain", 0, r=2, target_modules=["q_proj"])
    (plain / "adapter_model.safetensors").rename(plain / "adapter_model.bin")
    cfg["experts"][0]["from"] = str(plain)
    with pytest.raises(ez.ZooError, match="pickled adapter_model.bin"):
        ez.build(cfg, model=fresh()[0], tokenizer=tok)


@pytest.mark.real
def test_real_smollm2_adapter_expert_equals_peft(tmp_path):
    model, tok = ez.load_base("smollm2-135m")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], layers_to_transform=[28, 29],
                        init_lora_weights=False)
    with building_peft_model():
        get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
        peft_model = PeftModel.from_pretrained(ez.load_base("smollm2-135m")[0], str(tmp_path / "adapter"))
    ids = tok("def mean(xs): return sum(xs) / len(xs)", return_tensors="pt")["input_ids"]
    expected = logits(peft_model, ids)
    zoo = ez.build({"base": "smollm2-135m", "sites": ["attn.q_proj", "mlp.down_proj"], "layers": [28, 29],
                    "experts": [{"name": "a", "kind": "lora", "from": str(tmp_path / "adapter")}]})
    with zoo.force_expert("a"):
        assert_close(logits(zoo, ids), expected, atol=1e-4)
    assert (expected - logits(ez.load_base("smollm2-135m")[0], ids)).abs().max() > 1e-3
