"""Pruning: the most used experts (routing frequency summed over sites) are kept; merging folds a dropped expert into
the most similar kept one of its kind (LoRA: exact when the ranks allow); NLL before/after is reported; the pruned
zoo saves and loads; bad --keep exits with code 2."""
from __future__ import annotations

import json

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.data import tokenize
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.extras.prune import merge_lora, plan, prune, site_inputs
from helpers import assert_close, logits, make_zoo, perturb

NAMES = ["l0", "l1", "l2", "l3", "m0", "m1"]


def six_zoo():
    zoo = make_zoo(experts=[{"name": n, "kind": "lora", "rank": 4} if n[0] == "l" else {"name": n, "kind": "mlp", "hidden": 16}
                            for n in NAMES], router_cfg={"kind": "learned", "top_k": 2})
    perturb(zoo, seed=3)
    return zoo


def examples(tok, n: int = 12):
    return tokenize([{"text": f"line {i}: the {'cat' if i % 2 else 'dog'} sat on mat {i * 7}"} for i in range(n)], tok, 48)


def test_prune_keeps_the_most_used(ids):
    zoo = six_zoo()
    data = examples(zoo.tokenizer)
    usage = evaluate(zoo, data, pad_id=256, progress=False)["expert_share"]
    want = sorted(NAMES, key=lambda n: -usage[n])[:3]
    report = prune(zoo, data, keep=3, progress=False)
    assert sorted(report["kept"]) == sorted(want) and zoo.expert_names == report["kept"]
    assert sorted(report["dropped"]) == sorted(set(NAMES) - set(want))
    assert all(list(layer.experts) == report["kept"] for layer in zoo.layers)
    assert report["nll_after"] == pytest.approx(evaluate(zoo, data, pad_id=256, progress=False)["nll"])
    assert report["nll_before"] != report["nll_after"]
    assert set(report["expert_share_after"]) == set(want)


def test_merge_lora_is_exact_when_the_summed_rank_fits():
    zoo = six_zoo()
    a, b = zoo.layers[0].experts["l0"], zoo.layers[0].experts["l1"]
    with torch.no_grad():
        for e in (a, b):
            e.lora_A[2:] = 0  # each of rank 2: their weighted sum has rank <= 4, the kept rank
    x = torch.randn(5, a.d_in)
    want = 0.75 * a(x) + 0.25 * b(x)
    a.load_state_dict(merge_lora([a, b], [0.75, 0.25]))
    assert_close(a(x), want, atol=1e-5)


def test_merge_goes_to_the_most_similar_kept_expert():
    zoo = six_zoo()
    with torch.no_grad():
        for layer in zoo.layers:  # l3 is a near copy of l1
            for p3, p1 in zip(layer.experts["l3"].parameters(), layer.experts["l1"].parameters()):
                p3.copy_(p1 + 0.01 * torch.randn_like(p1))
    inputs = site_inputs(zoo, examples(zoo.tokenizer), pad_id=256)
    usage = {"l0": 0.3, "l1": 0.3, "l2": 0.1, "l3": 0.0, "m0": 0.2, "m1": 0.1}
    decided = plan(zoo, usage, 3, True, inputs)
    assert decided["kept"] == ["l0", "l1", "m0"]
    assert decided["merged_into"]["l3"] == "l1" and decided["merged_into"]["m1"] == "m0"


def test_cli_prune_with_merge(tmp_path, capsys):
    zoo = six_zoo()
    zoo.save(tmp_path / "zoo")
    data = tmp_path / "task.txt"
    data.write_text("\n\n".join(f"line {i}: the cat sat on mat {i * 7}" for i in range(10)))
    assert main(["prune", str(tmp_path / "zoo"), "--data", str(data), "--keep", "2", "--merge", "--max-len", "48",
                 "-o", str(tmp_path / "small")]) == 0
    report = json.loads((tmp_path / "small" / "prune.json").read_text())
    assert len(report["kept"]) == 2 and report["merge"] and report["nll_before"] > 0 and report["nll_after"] > 0
    merged = [d for d, k in report["merged_into"].items() if k]
    assert merged, report["merged_into"]  # 6 experts of 2 kinds into 2: something was merged
    small = ez.load(tmp_path / "small")
    assert small.expert_names == report["kept"]
    ids = torch.randint(0, 256, (1, 12))
    assert torch.isfinite(logits(small, ids)).all()
    assert "merged into" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:  # argparse refuses --keep 0 before anything is loaded
        main(["prune", str(tmp_path / "zoo"), "--data", str(data), "--keep", "0", "-o", str(tmp_path / "none")])
    assert refused.value.code == 2
    assert main(["prune", str(tmp_path / "zoo"), "--data", str(data), "--keep", "6", "-o", str(tmp_path / "all")]) == 2


def test_prune_a_fixed_router_zoo_saves(tmp_path):
    zoo = make_zoo(experts=[{"name": n, "kind": "lora", "rank": 4} for n in ("a", "b", "c")],
                   router_cfg={"kind": "fixed", "experts": ["a", "c"]})
    perturb(zoo)
    report = prune(zoo, examples(zoo.tokenizer, 4), keep=2, progress=False)
    assert report["kept"] == ["a", "c"]
    zoo.save(tmp_path / "z")
    assert ez.load(tmp_path / "z").zoo_config.router.options.experts == ["a", "c"]
