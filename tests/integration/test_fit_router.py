"""`zoo fit-router` on a tiny zoo of four LoRA experts and four synthetic domains: fit, evaluate with --label,
add a fifth expert with --add (the other experts' routing state stays bit-identical), and bad input (exit 2)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import expertzoo
from expertzoo.cli import main
from helpers import perturb
from test_routers_accuracy import NAMES, domain_texts

FIFTH = "fifth"
BASE_CONFIG = {"base": "tiny:llama", "layers": [0], "router": {"kind": "uniform"},
               "experts": [{"name": n, "kind": "lora", "rank": 4} for n in NAMES]}
FAST = {"rnd": ["steps=60"], "phatgoose": ["steps=4"], "centroid": []}


def write_docs(path: Path, texts: list[str]) -> str:
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Train and held-out .txt files per domain, a fifth domain (digits again, another seed), a built zoo."""
    root = tmp_path_factory.mktemp("fit")
    train = {n: write_docs(root / f"{n}-train.txt", domain_texts(n, 24, seed=0)) for n in NAMES}
    test = {n: write_docs(root / f"{n}-test.txt", domain_texts(n, 12, seed=1)) for n in NAMES}
    train[FIFTH] = write_docs(root / "fifth-train.txt", domain_texts("digits", 24, seed=2))
    (root / "zoo.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    assert main(["build", str(root / "zoo.yaml"), "-o", str(root / "zoo")]) == 0
    return {"root": root, "train": train, "test": test, "zoo": str(root / "zoo")}


def data_args(paths: dict, names) -> list[str]:
    return ["--data", *[f"{n}={paths[n]}" for n in names]]


def router_state(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(Path(directory) / "experts.safetensors").items() if ".router." in k}


def test_fit_then_eval_with_labels(files):
    out = files["root"] / "rnd"
    assert main(["fit-router", files["zoo"], "--kind", "rnd", *data_args(files["train"], NAMES), "-o", str(out),
                 "--option", *FAST["rnd"], "--top-k", "1"]) == 0
    meta = json.loads((out / "zoo.json").read_text())
    assert meta["config"]["router"]["kind"] == "rnd" and meta["config"]["router"]["top_k"] == 1
    assert meta["config"]["router"]["steps"] == 60
    state = router_state(out)
    assert state and all(torch.equal(v, torch.ones(4)) for k, v in state.items() if k.endswith(".fitted"))
    report = files["root"] / "eval.json"
    assert main(["eval", str(out), *data_args(files["test"], NAMES), "--label", *[f"{n}={n}" for n in NAMES],
                 "--json", str(report)]) == 0
    results = json.loads(report.read_text())["datasets"]
    for name in NAMES:
        assert {"tokens", "nll", "ppl", "load", "expert_share", "expert_weight", "flops_saved"} <= set(results[name])
        assert results[name]["routing_accuracy"] >= 0.9, (name, results[name]["routing_accuracy"])


@pytest.mark.parametrize("kind", ["centroid", "rnd", "phatgoose"])
def test_add_fifth_expert_leaves_the_others_bit_identical(kind, files):
    root = files["root"] / kind
    four, five, added, scratch = (root / n for n in ("four", "five", "added", "scratch"))
    options = ["--option", *FAST[kind]] if FAST[kind] else []
    assert main(["fit-router", files["zoo"], "--kind", kind, *data_args(files["train"], NAMES), "-o", str(four),
                 *options]) == 0
    zoo = expertzoo.load(four)
    zoo.add_expert({"name": FIFTH, "kind": "lora", "rank": 4})
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in zoo.expert_parameters(FIFTH):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    zoo.save(five)
    assert main(["fit-router", str(five), "--add", *data_args(files["train"], [FIFTH]), "-o", str(added)]) == 0
    before, after = router_state(four), router_state(added)
    assert before.keys() == after.keys()
    for key, old in before.items():
        new = after[key]
        if new.shape == old.shape:  # shared state (rnd's target network)
            assert torch.equal(new, old), key
        else:  # per-expert state: rows of the first four experts untouched, the fifth fitted
            assert new.shape[0] == old.shape[0] + 1 and torch.equal(new[:4], old), key
    assert all(v[4] == 1.0 for k, v in after.items() if k.endswith(".fitted"))
    # fitting all five from scratch gives the same state: each expert's part depends on its own data only
    assert main(["fit-router", str(five), "--kind", kind, *data_args(files["train"], [*NAMES, FIFTH]), "-o",
                 str(scratch), *options]) == 0
    for key, t in router_state(scratch).items():
        assert torch.equal(t, after[key]), key


def test_arrow_needs_no_data_and_trained_lora(files, tmp_path):
    zoo = expertzoo.load(files["zoo"])
    assert main(["fit-router", files["zoo"], "--kind", "arrow", "-o", str(tmp_path / "untrained")]) == 2
    perturb(zoo)
    zoo.save(tmp_path / "trained")
    assert main(["fit-router", str(tmp_path / "trained"), "--kind", "arrow", "-o", str(tmp_path / "arrow")]) == 0
    protos = [v for k, v in router_state(tmp_path / "arrow").items() if k.endswith("prototypes")]
    assert protos and all(torch.allclose(p.norm(dim=-1), torch.ones(4), atol=1e-5) for p in protos)


@pytest.mark.parametrize("argv,message", [
    (["--kind", "rnd", "--data", "lower={lower}"], "expert 'digits' has no --data"),
    (["--kind", "learned", "--data", "lower={lower}"], "not built from data"),
    (["--kind", "centroid", "--data", "nope={lower}"], "no expert named 'nope'"),
    (["--add", "--kind", "rnd", "--data", "lower={lower}"], "--add keeps the zoo's uniform router"),
    (["--data", "lower={lower}"], "--kind is missing"),
    (["--kind", "centroid", "--data", "lower"], "file 'lower' does not exist"),
    (["--kind", "centroid", "--option", "pool=max", "--data", "lower={lower}"], "pool"),
])
def test_bad_input_exits_2(files, tmp_path, capsys, argv, message):
    argv = [a.format(**files["train"]) for a in argv]
    assert main(["fit-router", files["zoo"], *argv, "-o", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_arrow_with_mlp_experts_is_refused(tmp_path, capsys):
    cfg = {**BASE_CONFIG, "experts": [{"name": "m", "kind": "mlp", "hidden": 8}]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["build", str(tmp_path / "zoo.yaml"), "-o", str(tmp_path / "zoo")]) == 0
    assert main(["fit-router", str(tmp_path / "zoo"), "--kind", "arrow", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "arrow" in err and "expert 'm' is kind mlp" in err
