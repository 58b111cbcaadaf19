"""Stacking: a zoo of 64 tiny experts of four kinds (LoRA, MLP, FFN, DiT; 16 each) with a learned top-2 router builds,
spreads tokens over many experts, saves and loads to identical logits, generates the same tokens, and evaluates."""
from __future__ import annotations

import json

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from helpers import fresh, logits, perturb

KINDS = {"lora": {"rank": 4}, "mlp": {"hidden": 16}, "ffn": {}, "dit": {"width": 16, "heads": 2, "depth": 1}}
N = 64


def config() -> dict:
    experts = [{"name": f"{kind}{i // len(KINDS):02d}", "kind": kind, **opts}
               for i, (kind, opts) in enumerate(list(KINDS.items()) * (N // len(KINDS)))]
    return {"base": "tiny:llama", "experts": experts, "router": {"kind": "learned", "top_k": 2}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, tok = fresh()
    zoo = ez.build(config(), model=model, tokenizer=tok)
    perturb(zoo, router_scale=1.0)
    out = tmp_path_factory.mktemp("stack") / "zoo64"
    zoo.save(out)
    return zoo, out


def test_64_experts_round_trip(saved):
    zoo, out = saved
    assert len(zoo.expert_names) == N and sorted({e.kind for e in zoo.zoo_config.experts}) == sorted(KINDS)
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    with zoo.trace() as trace:
        want = logits(zoo, ids)
    used = torch.cat([r["indices"].flatten() for r in trace.records]).unique()
    assert len(used) > N // 4  # the router spreads 120 token-sites over many experts
    loaded = ez.load(out)
    assert loaded.expert_names == zoo.expert_names
    assert torch.equal(logits(loaded, ids), want)
    prompt = ids[:1, :6]
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(loaded.generate(prompt, **kw), zoo.generate(prompt, **kw))


def test_64_expert_zoo_from_the_cli(saved, tmp_path, capsys):
    _, out = saved
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"stacked experts line {i}" for i in range(4)))
    assert main(["eval", str(out), "--data", f"d={data}", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["experts"]) == N and report["datasets"]["d"]["load"] == pytest.approx(2.0)
    assert sum(report["datasets"]["d"]["expert_share"].values()) == pytest.approx(1.0)
    assert main(["generate", str(out), "--prompt", "stacked", "--max-new-tokens", "4", "--show-routing"]) == 0
    assert main(["info", str(out)]) == 0
    assert "dit15" in capsys.readouterr().out
