"""Export: Mixtral / Qwen3-MoE folders load in a process that never imports expertzoo and give the zoo's logits;
the `zoo` model type loads any zoo through AutoModelForCausalLM; what a format cannot express is a clear error."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.export import export
from helpers import assert_close, fresh, logits, perturb

TOLERANCE = 1e-4
PLAIN_LOAD = textwrap.dedent("""
    import sys, torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(1)
    ids = load_file(sys.argv[1])["ids"]
    out = {}
    for i, folder in enumerate(sys.argv[3:]):
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            out[f"{i}"] = model(input_ids=ids).logits
        out[f"{i}.moe"] = torch.tensor([type(model).__name__.endswith("MoeForCausalLM") or
                                        type(model).__name__ == "MixtralForCausalLM"])
    assert not any(m.startswith("expertzoo") for m in sys.modules), "expertzoo was imported"
    save_file(out, sys.argv[2])
""")


def ffn_zoo(arch: str, n: int = 3, **config) -> ez.Zoo:
    model, tok = fresh(arch)
    experts = [{"name": f"e{i}", "kind": "ffn"} for i in range(n)]
    zoo = ez.build({"base": f"tiny:{arch}", "experts": experts, "router": {"kind": "learned", "top_k": 2}, **config},
                   model=model, tokenizer=tok)
    perturb(zoo, seed=len(arch))
    return zoo


CASES = [("llama", "mixtral", {"layers": [1]}), ("mistral", "mixtral", {}), ("qwen3", "qwen3_moe", {"layers": [0]}),
         ("llama", "mixtral", {"router": {"kind": "uniform"}})]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ids):
    """Every case exported, then all loaded by one plain-transformers subprocess: (zoo logits, loaded logits)."""
    root = tmp_path_factory.mktemp("export")
    expected, folders = [], []
    for i, (arch, fmt, config) in enumerate(CASES):
        zoo = ffn_zoo(arch, **config)
        expected.append(logits(zoo, ids))
        folders.append(root / f"{i}-{arch}-{fmt}")
        export(zoo, folders[-1], fmt)
    save_file({"ids": ids}, root / "ids.safetensors")
    script = root / "load.py"
    script.write_text(PLAIN_LOAD, encoding="utf-8")
    subprocess.run([sys.executable, str(script), str(root / "ids.safetensors"), str(root / "out.safetensors"),
                    *map(str, folders)], check=True, cwd=root, timeout=600)
    got = load_file(root / "out.safetensors")
    return expected, got, folders


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{a}-{f}-{'-'.join(c) or 'all'}" for a, f, c in CASES])
def test_moe_export_loads_without_expertzoo_and_equals_the_zoo(exported, case):
    expected, got, folders = exported
    assert bool(got[f"{case}.moe"])
    diff = (got[str(case)] - expected[case]).abs().max().item()
    assert diff <= TOLERANCE, f"max abs logit difference {diff:.3g}"
    assert (folders[case] / "tokenizer.json").is_file()
    assert not json.loads((folders[case] / "config.json").read_text()).get("auto_map")  # no remote code


def test_zoo_format_loads_any_zoo_through_auto_classes(tmp_path, ids):
    model, tok = fresh("llama")
    zoo = ez.build({"base": "tiny:llama", "sites": ["mlp", "attn.q_proj"], "experts": [
        {"name": "a", "kind": "lora", "rank": 2}, {"name": "b", "kind": "mlp", "hidden": 8}, {"name": "c", "kind": "ffn"}],
        "router": {"kind": "learned", "top_k": 2, "null_experts": 1, "granularity": "sequence"}},
        model=model, tokenizer=tok)
    perturb(zoo)
    assert main(["export", _saved(zoo, tmp_path), "--format", "zoo", "-o", str(tmp_path / "hf")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(loaded).__name__ == "ZooForCausalLM"
    assert_close(logits(loaded, ids), logits(zoo, ids), atol=0.0)
    out = loaded.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=256)
    assert torch.equal(out, zoo.generate(ids[:1], max_new_tokens=3, do_sample=False, pad_token_id=256))


def _saved(zoo: ez.Zoo, tmp_path: Path) -> str:
    zoo.save(tmp_path / "zoo")
    return str(tmp_path / "zoo")


@pytest.mark.parametrize("arch,fmt,config,words", [
    ("llama", "mixtral", {"router": {"kind": "learned", "null_experts": 1}}, "router null_experts: 1"),
    ("llama", "mixtral", {"router": {"kind": "learned", "always_on_base": True}}, "router always_on_base: True"),
    ("llama", "mixtral", {"router": {"kind": "learned", "granularity": "sequence"}}, "router granularity: sequence"),
    ("llama", "mixtral", {"router": {"kind": "learned", "scope": "global"}}, "router scope: global"),
    ("llama", "mixtral", {"router": {"kind": "fixed", "experts": ["e0"]}}, "router kind 'fixed'"),
    ("llama", "mixtral", {"sites": ["attn"]}, "are not the MLP blocks"),
    ("llama", "qwen3_moe", {}, "cannot export a llama base as qwen3_moe"),
    ("gpt2", "mixtral", {}, "cannot export a gpt2 base as mixtral"),
])
def test_what_a_format_cannot_express_is_named(arch, fmt, config, words, tmp_path):
    zoo = ffn_zoo(arch, n=2, **config)
    with pytest.raises(ez.ZooError, match="--format zoo") as err:
        export(zoo, tmp_path / "out", fmt)
    assert words in str(err.value)
    assert not (tmp_path / "out").exists()


def test_lora_experts_are_refused_by_mixtral_with_the_reason(tmp_path, capsys):
    model, tok = fresh("llama")
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 2}]}, model=model, tokenizer=tok)
    assert main(["export", _saved(zoo, tmp_path), "--format", "mixtral", "-o", str(tmp_path / "mx")]) == 2
    err = capsys.readouterr().err
    assert "expert 'a' (kind lora, residual) is not a whole FFN" in err and "--format zoo" in err
