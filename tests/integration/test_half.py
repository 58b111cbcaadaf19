"""bfloat16 / float16 zoos end to end: experts and base in the half dtype, routing in float32; the forward close to
the float32 zoo's, compiled equal to eager, save/load keeping every dtype."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

import expertzoo
from expertzoo.cli import main
from helpers import EXPERT_KINDS, expert, padded, perturb, random_ids

NAMES = ["e1", "e2", "e3"]


def half_zoo(kind: str, dtype: torch.dtype):
    """The same perturbed zoo twice: float32, and built on the base loaded in `dtype`."""
    cfg = {"base": "tiny:llama", "experts": [expert(n, kind) for n in NAMES],
           "router": {"kind": "learned", "top_k": 2}}
    model, tok = expertzoo.load_base("tiny:llama")
    full = expertzoo.build(cfg, model=model, tokenizer=tok)
    perturb(full)
    model, tok = expertzoo.load_base("tiny:llama", dtype=dtype)
    half = expertzoo.build(cfg, model=model, tokenizer=tok)
    half.load_zoo_state_dict({k: v.to(half.zoo_state_dict()[k].dtype) for k, v in full.zoo_state_dict().items()})
    return full, half


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", EXPERT_KINDS)
def test_half_zoo_routes_in_float32_and_matches_float32(kind, dtype, tmp_path):
    full, half = half_zoo(kind, dtype)
    assert {p.dtype for p in half.expert_parameters()} == {dtype}
    assert {p.dtype for p in half.router_parameters()} == {torch.float32}
    ids, mask = padded([random_ids(1, 7, seed=1)[0], random_ids(1, 5, seed=2)[0]])
    with torch.no_grad():
        want = full(input_ids=ids, attention_mask=mask).logits
        got = half(input_ids=ids, attention_mask=mask).logits
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got.float() - want).abs().max() < 0.1  # half precision through two tiny layers
        torch._dynamo.reset()
        compiled = torch.compile(half.model, fullgraph=True, backend="eager")(input_ids=ids, attention_mask=mask)
        assert torch.equal(compiled.logits, got)
    half.save(tmp_path / "zoo")
    model, tok = expertzoo.load_base("tiny:llama", dtype=dtype)
    back = expertzoo.load(tmp_path / "zoo", model=model, tokenizer=tok)
    assert {p.dtype for p in back.router_parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, attention_mask=mask).logits, got)


def test_cli_generate_and_eval_in_bfloat16(tmp_path, capsys):
    """`--dtype bfloat16`: the zoo runs in bfloat16 (its routers in float32) and still generates and evaluates."""
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump({"base": "tiny:llama", "experts": [{"name": "code", "kind": "lora", "rank": 4}],
                                      "router": {"kind": "learned", "top_k": 1}}))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": "some text %d" % i}) for i in range(4)) + "\n")
    assert main(["build", str(config), "-o", str(tmp_path / "zoo")]) == 0
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", "hello", "--max-new-tokens", "4",
                 "--dtype", "bfloat16"]) == 0
    out = tmp_path / "eval.json"
    assert main(["eval", str(tmp_path / "zoo"), "--data", f"d={data}", "--dtype", "bfloat16", "--json", str(out)]) == 0
    assert json.loads(out.read_text())


def test_cuda_graphs_only_where_the_experts_can_be_captured():
    """Compiled generation asks for CUDA graphs unless an FFN expert would loop over group ends read on the host:
    in float32 it does; in bfloat16 (rows of 16-byte multiples) it runs the native grouped kernel."""
    full, half = half_zoo("ffn", torch.bfloat16)
    assert not any(e.graph_capturable() for layer in full.layers for e in layer.experts.values())
    assert all(e.graph_capturable() for layer in half.layers for e in layer.experts.values())
    lora, _ = half_zoo("lora", torch.bfloat16)
    assert all(e.graph_capturable() for layer in lora.layers for e in layer.experts.values())
