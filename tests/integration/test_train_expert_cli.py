"""`zoo train-expert` on a tiny model: every kind (lora, mlp, ffn, dit) lowers held-out NLL and writes an expert folder
that a config takes `from:`; a DiT distilled from a LoRA teacher recovers its gain at a higher cost; an interrupted
run resumed with --resume equals an uninterrupted one; bad input exits with code 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import expertzoo as ez
import expertzoo.training.train
from expertzoo.cli import main
from expertzoo.data import load_examples
from expertzoo.data.domains import prepare
from expertzoo.evaluation.evaluate import evaluate
from helpers import fresh

OPTIONS = {"lora": ["--option", "rank=4", "alpha=8"], "mlp": ["--option", "hidden=16"], "ffn": [],
           "dit": ["--option", "width=32", "--option", "depth=1"]}  # both spellings: several values, repeated flag


def write_domain(path: Path, n: int, seed: int) -> Path:
    """A learnable toy domain: arithmetic-like lines in a fixed format."""
    rows = [{"text": f"{(seed + i) % 7} plus {(seed + 2 * i) % 5} makes {((seed + i) % 7) + ((seed + 2 * i) % 5)}; "
                     f"{i % 3} times two is {2 * (i % 3)}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("domain")
    return {"train": write_domain(root / "train.jsonl", 32, 0), "eval": write_domain(root / "eval.jsonl", 8, 100)}


def train_cli(data: dict[str, Path], out: Path, kind: str, *extra: str) -> int:
    return main(["train-expert", "--base", "tiny:llama", "--kind", kind, "--data", str(data["train"]), "--eval-data",
                 str(data["eval"]), "--max-len", "48", "--lr", "1e-2", *OPTIONS[kind],
                 *extra, "-o", str(out)])


@pytest.fixture(scope="module")
def lora_teacher(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "lora"
    assert train_cli(data, out, "lora", "--steps", "15") == 0
    return out


@pytest.mark.parametrize("kind", ["lora", "mlp", "ffn", "dit"])
def test_train_expert_lowers_held_out_nll(kind, data, tmp_path):
    out = tmp_path / kind
    assert train_cli(data, out, kind, "--steps", "12") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["kind"] == kind and metrics["name"] == kind and len(metrics["losses"]) == 12
    assert metrics["nll"]["expert"] < metrics["nll"]["base"] - 0.1, metrics["nll"]
    assert metrics["flops_per_token"] > 0 and metrics["eval_tokens"] > 0
    assert {"lora": {"rank": 4, "alpha": 8.0}, "dit": {"width": 32, "depth": 1}}.get(kind, {}).items() <= metrics["options"].items()
    assert not (out / "checkpoint").exists()
    # the folder is an expert a config takes `from:`, giving the same held-out NLL
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "x", "kind": kind, "from": str(out)}],
                    "router": {"kind": "fixed", "experts": ["x"]}}, model=model, tokenizer=tok)
    held = load_examples(data["eval"], tok, 48)
    nll = evaluate(zoo, held, pad_id=tok.pad_token_id, progress=False)["nll"]
    assert nll == pytest.approx(metrics["nll"]["expert"], abs=1e-5)


def test_dit_distilled_from_a_lora_teacher(data, lora_teacher, tmp_path):
    out = tmp_path / "dit"
    assert train_cli(data, out, "dit", "--teacher", str(lora_teacher), "--steps", "0", "--distill-steps", "120",
                     "--distill-lr", "3e-3") == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["nll"]["teacher"] < m["nll"]["base"] - 0.1
    assert m["recovery"] > 0.7, m["nll"]  # share of the teacher's held-out gain the DiT keeps
    assert m["distill"]["loss_last"] < m["distill"]["loss_first"] and m["distill"]["rel_error"] < 0.3
    assert m["flops_per_token"] > 10 * m["teacher"]["flops_per_token"]  # K steps of a transformer vs a LoRA
    assert m["teacher"]["kind"] == "lora" and m["losses"] == []


def test_resume_after_interruption_equals_an_uninterrupted_run(data, lora_teacher, tmp_path, monkeypatch):
    """A DiT distilled then trained end to end: killed after its first checkpoint, resumed, it ends bit-identical."""
    args = ("--teacher", str(lora_teacher), "--distill-steps", "20", "--steps", "6", "--checkpoint-every", "3")
    assert train_cli(data, tmp_path / "whole", "dit", *args) == 0
    save = expertzoo.training.train._save_checkpoint

    def save_then_die(*a, **kw):
        save(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(expertzoo.training.train, "_save_checkpoint", save_then_die)
    out = tmp_path / "cut"
    assert train_cli(data, out, "dit", *args) == 130
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["distilled.safetensors", "step-00000003"]
    monkeypatch.setattr(expertzoo.training.train, "_save_checkpoint", save)
    assert train_cli(data, out, "dit", *args, "--resume") == 0
    whole, cut = load_file(tmp_path / "whole" / "expert.safetensors"), load_file(out / "expert.safetensors")
    assert whole.keys() == cut.keys()
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    losses = [json.loads((d / "metrics.json").read_text())["losses"] for d in (tmp_path / "whole", out)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


@pytest.mark.parametrize("extra,match", [
    (["--kind", "ffn", "--teacher", "TEACHER"], "replaces its block"),
    (["--kind", "dit", "--teacher", "/nonexistent"], "not an expert folder"),
    (["--kind", "lora", "--option", "rank"], "KEY=VALUE"),
    (["--kind", "lora", "--option", "rnk=2"], "'rnk'"),
    (["--kind", "lora", "-o", "NOTEMPTY"], "is not an expert folder"),
])
def test_bad_input_exits_2(extra, match, data, lora_teacher, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    extra = [str(lora_teacher) if e == "TEACHER" else str(busy) if e == "NOTEMPTY" else e for e in extra]
    argv = ["train-expert", "--base", "tiny:llama", "--data", str(data["train"]), "--steps", "1", "-o", str(tmp_path / "x"), *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"


@pytest.mark.real
def test_one_dit_step_on_smollm2(tmp_path):
    """The real base: one LM-loss step of a DiT at the last MLP block, on GSM8K windows; the folder loads back."""
    train, test = prepare("math")
    out = tmp_path / "dit"
    assert main(["train-expert", "--base", "smollm2-135m", "--kind", "dit", "--data", str(train), "--eval-data", str(test),
                 "--layers", "29", "--steps", "1", "--max-len", "32", "--limit", "4", "--eval-limit", "2",
                 "--batch-size", "2", "-o", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["sites"] == ["model.layers.29.mlp"] and len(m["losses"]) == 1
    zoo = ez.build({"base": "smollm2-135m", "layers": [29], "experts": [{"name": "d", "kind": "dit", "from": str(out)}],
                    "router": {"kind": "fixed", "experts": ["d"]}})
    assert zoo.layers[0].experts["d"].flops_per_token() == m["flops_per_token"]
    held = load_examples(test, zoo.tokenizer, 32, limit=2)
    pad = zoo.tokenizer.pad_token_id if zoo.tokenizer.pad_token_id is not None else zoo.tokenizer.eos_token_id
    assert evaluate(zoo, held, pad_id=pad, progress=False)["nll"] == pytest.approx(m["nll"]["expert"], abs=1e-4)
