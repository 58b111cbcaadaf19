"""Quantized bases (`quantize: int8`, torchao weight-only): the base's projections become int8, experts and routers
stay float32; a quantized zoo builds, trains an expert, saves and loads, and stays close to the float32 zoo."""
from __future__ import annotations

import json

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.io.quantize import weight_bytes
from helpers import fresh, logits, perturb

pytest.importorskip("torchao")
EXPERTS = [{"name": "l", "kind": "lora", "rank": 2}, {"name": "b", "kind": "block_lora", "rank": 2},
           {"name": "f", "kind": "ffn"}]


def zoo(quantize: str) -> ez.Zoo:
    model, tok = fresh()
    z = ez.build({"base": "tiny:llama", "sites": ["mlp"], "experts": EXPERTS, "quantize": quantize,
                  "router": {"kind": "learned", "top_k": 2}}, model=model, tokenizer=tok)
    perturb(z, seed=5)
    return z


def test_int8_base_with_full_precision_experts_is_close_to_float32(ids):
    full, q = zoo("none"), zoo("int8")
    layer = q.layers[0]
    assert type(layer.base_layer.down_proj.weight.data).__name__ != "Tensor"  # the base's projection: int8
    assert type(q.model.model.layers[0].self_attn.q_proj.weight.data) is not torch.Tensor
    assert all(p.dtype == torch.float32 and type(p.data) is torch.Tensor for p in q.expert_parameters())
    assert all(p.dtype == torch.float32 for p in q.router_parameters())
    assert weight_bytes(q.model) < 0.75 * weight_bytes(full.model)
    a, b = logits(full, ids), logits(q, ids)
    assert (a - b).abs().max() < 0.05 * a.abs().max()  # int8 rounding, not a different model
    for name in ("l", "b", "f"):
        with q.force_expert(name):
            assert logits(q, ids).isfinite().all()


def test_quantized_zoo_saves_loads_and_records_quantize(tmp_path, ids):
    q = zoo("int8")
    q.save(tmp_path / "z")
    assert json.loads((tmp_path / "z" / "zoo.json").read_text())["config"]["quantize"] == "int8"
    again = ez.load(tmp_path / "z")
    assert type(again.layers[0].base_layer.up_proj.weight.data) is not torch.Tensor
    assert torch.equal(logits(again, ids), logits(q, ids))


def test_train_expert_on_an_int8_base(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} plus {i} makes {2 * i}."}) + "\n" for i in range(12)))
    assert main(["train-expert", "--base", "tiny:llama", "--kind", "block_lora", "--option", "rank=2",
                 "--data", str(data), "--steps", "3", "--lr", "1e-2", "--batch-size", "2", "--max-len", "32", "--quantize", "int8",
                 "-o", str(tmp_path / "e")]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert len(metrics["losses"]) == 3 and all(0 < loss < 20 for loss in metrics["losses"])
    assert metrics["nll"]["expert"] < metrics["nll"]["base"] + 0.5  # trained on the int8 base, not broken by it


def test_int4_without_a_gpu_says_so():
    model, tok = fresh()
    with pytest.raises(ez.ZooError, match="int4 runs on a CUDA GPU only.*quantize: int8"):
        ez.build({"base": "tiny:llama", "experts": [], "quantize": "int4"}, model=model, tokenizer=tok)
