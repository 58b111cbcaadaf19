"""Co-LLM deferral between tiny:llama and an assistant zoo folder (tiny:llama + a LoRA trained on one domain): the
deferral rate follows eta (monotone, near the target on validation), the head defers more where the assistant is
better, generation with two KV caches equals a cache-free reference, the CLI round-trips, vocabularies are checked."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.extras.collab import Collab, check_vocab, load_collab, load_side, train_collab
from expertzoo.data import load_examples, tokenize
from expertzoo.training.train import train_expert
from helpers import fresh


def domain_a(i: int) -> str:
    return f"{i % 7} plus {i % 5} makes {i % 7 + i % 5}; {i % 3} times two is {2 * (i % 3)}."


def domain_b(i: int) -> str:
    rng = random.Random(i)
    return " ".join("".join(rng.choice("qwxzjk") for _ in range(4)) for _ in range(8))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The assistant (a zoo folder that knows domain A) and mixed train / validation data."""
    root = tmp_path_factory.mktemp("collab")
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 4}],
                    "router": {"kind": "fixed", "experts": ["a"]}}, model=model, tokenizer=tok)
    train_expert(zoo, "a", tokenize([{"text": domain_a(i)} for i in range(32)], tok, 64), steps=25, lr=1e-2,
                 progress=False)
    zoo.save(root / "assistant")
    out = {"assistant": root / "assistant"}
    for name, start, n in (("train", 0, 40), ("valid", 1000, 16)):
        rows = [{"text": (domain_a if i % 2 else domain_b)(start + i)} for i in range(n)]
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, fn in (("only_a", domain_a), ("only_b", domain_b)):
        out[name] = root / f"{name}.jsonl"
        out[name].write_text("".join(json.dumps({"text": fn(2000 + i)}) + "\n" for i in range(8)))
    return out


@pytest.fixture(scope="module")
def collab(files) -> Collab:
    base, assistant = load_side("tiny:llama"), load_side(str(files["assistant"]))
    tok = base[1]
    train, valid = (load_examples(files[k], tok, 64) for k in ("train", "valid"))
    return train_collab(base, assistant, train, valid, steps=150, weak_steps=50, target_rate=0.3)


def test_rate_is_near_the_target_on_validation(collab):
    report = collab.meta["validation"]
    assert abs(report["deferral_rate"] - 0.3) < 0.03, report
    assert report["nll_assistant"] < report["nll_base"]  # the assistant is better on the mixed data
    assert report["nll"] < report["nll_base"]


def test_rate_follows_eta(collab, files):
    valid = load_examples(files["valid"], collab.tokenizer, 64)
    eta, rates = collab.eta, []
    try:
        for value in (-0.01, 0.2, 0.5, 0.8, 0.95, 1.01):
            collab.eta = value
            rates.append(collab.evaluate(valid, pad_id=256))
    finally:
        collab.eta = eta
    shares = [r["deferral_rate"] for r in rates]
    assert shares == sorted(shares, reverse=True) and shares[0] == 1.0 and shares[-1] == 0.0
    assert rates[0]["nll"] == pytest.approx(rates[0]["nll_assistant"])  # always deferring = the assistant
    assert rates[-1]["nll"] == pytest.approx(rates[-1]["nll_base"])  # never deferring = the base


def test_head_defers_where_the_assistant_is_better(collab, files):
    rate = {k: collab.evaluate(load_examples(files[k], collab.tokenizer, 64), pad_id=256)["deferral_rate"]
            for k in ("only_a", "only_b")}
    assert rate["only_a"] > rate["only_b"] + 0.2, rate


def reference(collab: Collab, ids: torch.Tensor, steps: int) -> tuple[list[int], list[bool]]:
    """Cache-free greedy deferral: both models re-read the whole sequence at every step."""
    seq, new, deferred = ids[0].tolist(), [], []
    with torch.no_grad():
        for _ in range(steps):
            t = torch.tensor([seq])
            out = collab.base(input_ids=t, output_hidden_states=True)
            defer = bool(collab.defer_prob(out.hidden_states[-1][0, -1:])[0] > collab.eta)
            logits = collab.assistant(input_ids=t).logits if defer else out.logits
            token = int(logits[0, -1].argmax())
            seq.append(token)
            new.append(token)
            deferred.append(defer)
    return new, deferred


def test_generation_with_two_caches_equals_a_cache_free_reference(collab):
    ids = torch.tensor([collab.tokenizer("3 plus 4 makes 7; zzqk wxjq ", add_special_tokens=False)["input_ids"]])
    new, deferred = collab.generate(ids, max_new_tokens=16)
    assert (new, deferred) == reference(collab, ids, 16)
    assert len(new) == 16 and any(deferred) and not all(deferred), deferred  # both models wrote tokens
    eta = collab.eta
    try:
        collab.eta = 2.0  # never defer: the base's own greedy continuation
        with torch.no_grad():
            base = collab.base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert collab.generate(ids, max_new_tokens=8) == (base[0, ids.shape[1]:].tolist(), [False] * 8)
    finally:
        collab.eta = eta


def test_cli_collab_generate_eval(files, tmp_path, capsys):
    out = tmp_path / "collab"
    assert main(["collab", "--base", "tiny:llama", "--assistant", str(files["assistant"]), "--data", str(files["train"]),
                 "--eval-data", str(files["valid"]), "--steps", "60", "--weak-steps", "20", "--target-rate", "0.5",
                 "--max-len", "64", "-o", str(out)]) == 0
    meta = json.loads((out / "collab.json").read_text())
    assert abs(meta["validation"]["deferral_rate"] - 0.5) < 0.03 and meta["assistant"] == str(files["assistant"].resolve())
    assert load_collab(out).eta == pytest.approx(meta["eta"])
    assert main(["generate", str(out), "--prompt", "1 plus 2 makes", "--max-new-tokens", "6", "--show-routing"]) == 0
    assert "tokens deferred to the assistant" in capsys.readouterr().out
    report = tmp_path / "r.json"
    assert main(["eval", str(out), "--data", f"v={files['valid']}", "--max-len", "64", "--json", str(report)]) == 0
    got = json.loads(report.read_text())["datasets"]["v"]
    assert got["deferral_rate"] == pytest.approx(meta["validation"]["deferral_rate"], abs=1e-6)
    assert got["nll"] == pytest.approx(meta["validation"]["nll"], abs=1e-4)


def test_different_vocabularies_are_refused(tmp_path, files, capsys):
    model, tok = fresh()
    tok.add_tokens(["<extra>"])
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(ez.ZooError, match="tokenizers differ"):
        check_vocab(fresh()[1], tok)
    assert main(["collab", "--base", "tiny:llama", "--assistant", str(tmp_path / "other"), "--data",
                 str(files["train"]), "-o", str(tmp_path / "c")]) == 2
    assert "259 vs 260 tokens" in capsys.readouterr().err
