"""Experts where they belong, from the command line on a tiny Llama: the German case (an expert trained on one
layer with `zoo train-expert --layers` added with `zoo add-expert` to a zoo whose experts cover both layers, fitted
with `zoo fit-router --add`, evaluated with per-dataset oracles), `zoo remove-expert`, per-site pruning, and the
exports that need every expert at every layer refusing a mixed placement."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import expertzoo
from expertzoo.cli import main
from helpers import logits, random_ids
from test_fit_router import write_docs
from test_routers_accuracy import domain_texts

ZOO = {"base": "tiny:llama", "layers": "0-1", "router": {"kind": "centroid", "top_k": 1},
       "experts": [{"name": "lower", "kind": "lora", "rank": 4}, {"name": "digits", "kind": "mlp", "hidden": 16}]}
MLP0, MLP1 = "model.layers.0.mlp", "model.layers.1.mlp"


@pytest.fixture(scope="module")
def german(tmp_path_factory) -> dict:
    """A zoo of two experts at layers 0-1 fitted on their data, and an expert trained on layer 1 alone."""
    root = tmp_path_factory.mktemp("german")
    train = {n: write_docs(root / f"{n}.txt", domain_texts(n, 16, seed=0)) for n in ("lower", "digits", "upper")}
    test = {n: write_docs(root / f"{n}-test.txt", domain_texts(n, 6, seed=1)) for n in ("lower", "digits", "upper")}
    (root / "zoo.yaml").write_text(yaml.safe_dump(ZOO))
    assert main(["build", str(root / "zoo.yaml"), "-o", str(root / "built")]) == 0
    assert main(["fit-router", str(root / "built"), "--kind", "centroid", "--top-k", "1", "--data",
                 f"lower={train['lower']}", f"digits={train['digits']}", "-o", str(root / "zoo")]) == 0
    assert main(["train-expert", "--base", "tiny:llama", "--kind", "lora", "--layers", "1", "--data", train["upper"],
                 "--steps", "6", "--max-len", "48", "--lr", "1e-2", "--option", "rank=4", "-o",
                 str(root / "german-1")]) == 0
    return {"root": root, "train": train, "test": test}


def test_german_case_add_fit_add_eval(german):
    root, train, test = german["root"], german["train"], german["test"]
    added, fitted = root / "added", root / "fitted"
    assert main(["add-expert", str(root / "zoo"), "--from", str(root / "german-1"), "--name", "german",
                 "-o", str(added)]) == 0
    meta = json.loads((added / "zoo.json").read_text())
    spec = meta["config"]["experts"][-1]
    assert (spec["name"], spec["layers"], spec["sites"]) == ("german", [1], ["mlp"]) and "from" not in spec
    assert meta["provenance"]["german"]["source"] == str(root / "german-1")
    assert len(meta["provenance"]["german"]["sha256"]) == 64
    assert main(["fit-router", str(added), "--add", "--data", f"german={train['upper']}", "-o", str(fitted)]) == 0
    before, after = load_file(root / "zoo" / "experts.safetensors"), load_file(fitted / "experts.safetensors")
    assert torch.equal(after[f"{MLP0}.router.fitted"], before[f"{MLP0}.router.fitted"])  # german is not at layer 0
    assert after[f"{MLP1}.router.fitted"].tolist() == [1.0, 1.0, 1.0]
    assert torch.equal(after[f"{MLP1}.router.centroids"][:2], before[f"{MLP1}.router.centroids"])
    report = root / "eval.json"
    assert main(["eval", str(fitted), "--data", f"upper={test['upper']}", f"lower={test['lower']}",
                 "--label", "upper=german", "--force-expert", "upper=german", "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["experts"] == ["lower", "digits", "german"]
    upper, lower = result["datasets"]["upper"], result["datasets"]["lower"]
    assert upper["forced"] == ["german"] and "forced" not in lower
    assert upper["expert_share"]["german"] == 1.0 and upper["routing_accuracy"] == 1.0
    assert lower["expert_share"]["german"] < 1.0
    zoo = expertzoo.load(fitted)
    with zoo.trace() as t:
        zoo(input_ids=random_ids(1, 8))
    assert {r["site"]: r["experts"] for r in t.records} == {MLP0: ["lower", "digits"], MLP1: ["lower", "digits", "german"]}


def test_per_dataset_oracles_equal_separate_forced_runs(german):
    root, test = german["root"], german["test"]
    one, lower_only, digits_only = (root / f"{n}.json" for n in ("oracles", "lower-forced", "digits-forced"))
    data = ["--data", f"lower={test['lower']}", f"digits={test['digits']}"]
    assert main(["eval", str(root / "zoo"), *data, "--force-expert", "lower=lower", "digits=digits",
                 "--json", str(one)]) == 0
    assert main(["eval", str(root / "zoo"), *data, "--force-expert", "lower", "--json", str(lower_only)]) == 0
    assert main(["eval", str(root / "zoo"), *data, "--force-expert", "digits", "--json", str(digits_only)]) == 0
    both = json.loads(one.read_text())["datasets"]
    assert both["lower"]["nll"] == json.loads(lower_only.read_text())["datasets"]["lower"]["nll"]
    assert both["digits"]["nll"] == json.loads(digits_only.read_text())["datasets"]["digits"]["nll"]


@pytest.mark.parametrize("args, match", [(["--force-expert", "nope=lower"], "names dataset 'nope'"),
                                         (["--force-expert", "lower=nope"], "no expert named 'nope'"),
                                         (["--force-expert", "lower=lower", "--disable-expert", "lower"],
                                          "both forced and disabled")])
def test_bad_per_dataset_forcing_is_one_line(german, capsys, args, match):
    assert main(["eval", str(german["root"] / "zoo"), "--data", f"lower={german['test']['lower']}", *args]) == 2
    assert match in capsys.readouterr().err


def test_remove_expert_gives_back_the_zoo(german):
    root = german["root"]
    assert main(["add-expert", str(root / "zoo"), "--from", str(root / "german-1"), "-o", str(root / "plus")]) == 0
    recorded = json.loads((root / "german-1" / "expert.json").read_text())["name"]
    name = json.loads((root / "plus" / "zoo.json").read_text())["config"]["experts"][-1]["name"]
    assert name == recorded  # no --name: the name the expert folder recorded
    assert main(["remove-expert", str(root / "plus"), name, "-o", str(root / "minus")]) == 0
    ids = random_ids(2, 10)
    assert torch.equal(logits(expertzoo.load(root / "minus"), ids), logits(expertzoo.load(root / "zoo"), ids))


@pytest.mark.parametrize("args, match", [(["--from", "nowhere"], "does not exist"),
                                         (["--from", "GERMAN", "--name", "Bad Name"], "must match"),
                                         (["--from", "ZOO"], "pass --kind"),
                                         (["--from", "GERMAN", "--layers", "7"], "layer 7 does not exist")])
def test_bad_add_expert_is_one_line(german, capsys, args, match):
    root = german["root"]
    args = [{"ZOO": str(root / "zoo"), "GERMAN": str(root / "german-1")}.get(a, a) for a in args]
    assert main(["add-expert", str(root / "zoo"), *args, "-o", str(root / "bad")]) == 2
    assert match in capsys.readouterr().err


def test_mixtral_and_gguf_refuse_a_mixed_placement(tmp_path, capsys):
    cfg = {"base": "tiny:llama", "router": {"kind": "learned", "top_k": 1},
           "experts": [{"name": "a", "kind": "ffn"}, {"name": "b", "kind": "ffn", "layers": [1]}]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", str(tmp_path / "zoo.yaml"), "-o", str(tmp_path / "zoo")]) == 0
    for fmt in ("mixtral", "gguf"):
        assert main(["export", str(tmp_path / "zoo"), "--format", fmt, "-o", str(tmp_path / fmt)]) == 2
        err = capsys.readouterr().err
        assert "expert 'b' sits at 1 of the zoo's 2 MoE layers" in err and "--format zoo" in err
    assert main(["export", str(tmp_path / "zoo"), "--format", "zoo", "-o", str(tmp_path / "hf")]) == 0
    from transformers import AutoModelForCausalLM

    ids = random_ids(1, 9)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), ids),
                       logits(expertzoo.load(tmp_path / "zoo"), ids))


def test_per_site_pruning_keeps_each_sites_most_used_experts(german, tmp_path):
    root, test = german["root"], german["test"]
    out = tmp_path / "pruned"
    assert main(["add-expert", str(root / "zoo"), "--from", str(root / "german-1"), "--name", "german",
                 "-o", str(tmp_path / "three")]) == 0
    assert main(["prune", str(tmp_path / "three"), "--data", test["upper"], test["digits"], "--keep", "1",
                 "--per-site", "-o", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["per_site"] is True
    for site, decided in report["sites"].items():
        share = report["site_share"][site]
        assert len(decided["kept"]) == 1 and share[decided["kept"][0]] == max(share.values())
    zoo = expertzoo.load(out)
    assert {l.site.name: list(l.experts) for l in zoo.layers} == {s: d["kept"] for s, d in report["sites"].items()
                                                                   if d["kept"]}
    ids = random_ids(2, 10)
    assert torch.isfinite(logits(zoo, ids)).all()
