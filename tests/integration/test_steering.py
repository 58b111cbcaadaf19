"""Steering (Mixture of Tunable Experts) from the command line: `--force-expert` / `--disable-expert` on `zoo eval`
and `zoo generate` do what Zoo.force_expert / disable_expert do; misuse exits with code 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.data import load_examples
from expertzoo.evaluation.evaluate import evaluate
from helpers import make_zoo, perturb

NAMES = ["code", "math", "law"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    zoo = make_zoo(experts=[{"name": n, "kind": "lora", "rank": 4} for n in NAMES],
                   router_cfg={"kind": "learned", "top_k": 1})
    perturb(zoo, scale=0.5)
    out = tmp_path_factory.mktemp("steer") / "zoo"
    zoo.save(out)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "d.txt"
    path.write_text("\n\n".join(f"document {i} about things {i * 13}" for i in range(6)))
    return path


def eval_json(folder: Path, data: Path, tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    assert main(["eval", str(folder), "--data", f"d={data}", "--json", str(out), *flags]) == 0
    return json.loads(out.read_text())["datasets"]["d"]


def test_eval_force_and_disable(folder, data, tmp_path):
    free = eval_json(folder, data, tmp_path)
    assert sum(v > 0 for v in free["expert_share"].values()) >= 2  # the router spreads tokens
    forced = eval_json(folder, data, tmp_path, "--force-expert", "math")
    assert forced["expert_share"] == {"code": 0.0, "math": 1.0, "law": 0.0}
    two = eval_json(folder, data, tmp_path, "--force-expert", "math", "--force-expert", "law")
    assert two["expert_share"]["math"] == pytest.approx(0.5) and two["expert_weight"]["law"] == pytest.approx(0.5)
    busiest = max(free["expert_share"], key=free["expert_share"].get)
    disabled = eval_json(folder, data, tmp_path, "--disable-expert", busiest)
    assert disabled["expert_share"][busiest] == 0.0 and disabled["nll"] != free["nll"]
    with ez.load(folder).force_expert("math") as zoo:  # the same NLL as the Python API
        assert evaluate(zoo, load_examples(data, zoo.tokenizer), pad_id=256, progress=False)["nll"] == \
            pytest.approx(forced["nll"], abs=1e-6)


def test_generate_force_matches_the_api(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "6", "--force-expert", "law",
                 "--show-routing"]) == 0
    assert "[law]" in capsys.readouterr().out
    zoo = ez.load(folder)
    tok = zoo.tokenizer
    ids = tok("hello", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with zoo.force_expert("law"), torch.no_grad():
        want = zoo.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert main(["generate", str(folder), "--prompt", "hello", "--max-new-tokens", "6", "--force-expert", "law"]) == 0
    new = tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True)
    assert capsys.readouterr().out.rstrip("\n") == "hello" + new  # the prompt, then the new text


@pytest.mark.parametrize("target,flags,match", [
    ("tiny:llama", ["--force-expert", "code"], "not a zoo folder"),
    ("ZOO", ["--disable-expert", "nope"], "no expert named 'nope'"),
    ("ZOO", ["--force-expert", "code", "--disable-expert", "code"], "both forced and disabled"),
])
def test_misuse_exits_2(target, flags, match, folder, data, capsys):
    target = str(folder) if target == "ZOO" else target
    assert main(["eval", target, "--data", f"d={data}", *flags]) == 2
    assert match in capsys.readouterr().err
    assert main(["generate", target, "--prompt", "x", "--max-new-tokens", "2", *flags]) == 2
