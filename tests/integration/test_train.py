"""Training loops on tiny models: every expert kind learns, the router learns, resume reproduces a full run."""
from __future__ import annotations

import pytest
import torch

import expertzoo as ez
from expertzoo.data import tokenize
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.training.train import batch_at, train_expert, train_router


def _domain(ch: str, n: int = 12) -> list[dict]:
    return [{"text": (ch * (3 + i % 4) + " ") * 12} for i in range(n)]


def _zoo(kinds: list[str], router: dict | None = None) -> ez.Zoo:
    model, tok = ez.load_base("tiny:llama")
    experts = [{"name": f"e{i}", "kind": k} for i, k in enumerate(kinds)]
    return ez.build({"base": "tiny:llama", "experts": experts, "router": router or {"kind": "learned", "top_k": 1}},
                    model=model, tokenizer=tok)


@pytest.mark.parametrize("kind", sorted(ez.EXPERTS.names()))
def test_train_expert_lowers_held_out_nll(kind):
    zoo = _zoo([kind])
    train, held = tokenize(_domain("x"), zoo.tokenizer, 48), tokenize(_domain("x", 4), zoo.tokenizer, 48)
    pad = zoo.tokenizer.pad_token_id
    with zoo.force_expert("e0"):
        before = evaluate(zoo, held, pad_id=pad, progress=False)["nll"]
        train_expert(zoo, "e0", train, steps=15, lr=1e-2, progress=False)
        after = evaluate(zoo, held, pad_id=pad, progress=False)["nll"]
    assert after < before - 0.1, (kind, before, after)


def test_train_expert_touches_only_that_expert():
    zoo = _zoo(["lora", "mlp"])
    frozen = [p.detach().clone() for p in zoo.expert_parameters("e1") + zoo.router_parameters()]
    base = [p.detach().clone() for p in zoo.model.parameters() if not p.requires_grad]
    train_expert(zoo, "e0", tokenize(_domain("y"), zoo.tokenizer, 48), steps=3, lr=1e-2, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(frozen, zoo.expert_parameters("e1") + zoo.router_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(base, [p for p in zoo.model.parameters() if not p.requires_grad]))


def test_router_training_learns_which_expert_helps():
    zoo = _zoo(["lora", "lora"], {"kind": "learned", "top_k": 2, "granularity": "sequence"})
    tok, pad = zoo.tokenizer, zoo.tokenizer.pad_token_id
    data = {name: tokenize(_domain(ch), tok, 48) for name, ch in (("e0", "q"), ("e1", "z"))}
    for name, ex in data.items():
        train_expert(zoo, name, ex, steps=15, lr=1e-2, progress=False)
    mixed = [e for pair in zip(data["e0"], data["e1"]) for e in pair]
    losses = train_router(zoo, mixed, steps=25, lr=5e-2, progress=False)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    for name, ex in data.items():
        weights = evaluate(zoo, ex[:4], pad_id=pad, progress=False)["expert_weight"]
        assert weights[name] > 0.5, (name, weights)


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    data = tokenize(_domain("k"), ez.load_base("tiny:llama")[1], 48)
    full = _zoo(["lora"])
    full_losses = train_expert(full, "e0", data, steps=8, lr=1e-2, progress=False)
    cut = _zoo(["lora"])
    train_expert(cut, "e0", data, steps=4, lr=1e-2, progress=False, checkpoint_dir=tmp_path, checkpoint_every=4)
    resumed = _zoo(["lora"])  # a new process would start from fresh weights too
    losses = train_expert(resumed, "e0", data, steps=8, lr=1e-2, progress=False, checkpoint_dir=tmp_path,
                          checkpoint_every=4, resume=True)
    assert losses == full_losses
    for a, b in zip(full.expert_parameters("e0"), resumed.expert_parameters("e0")):
        assert torch.equal(a, b)


def test_batches_are_a_pure_function_of_step():
    data = tokenize(_domain("m", 7), ez.load_base("tiny:llama")[1], 16)
    assert batch_at(data, 5, 3, seed=1) == batch_at(data, 5, 3, seed=1)
    epoch = [e for s in range(len(data)) for e in batch_at(data, s, 1, seed=2)]
    assert sorted(map(id, epoch)) == sorted(map(id, data))  # one epoch visits every example once


def test_nothing_to_train_is_a_clear_error():
    zoo = _zoo([], {"kind": "uniform"})
    with pytest.raises(ez.ZooError, match="nothing to train"):
        train_router(zoo, tokenize(_domain("a"), zoo.tokenizer, 16), steps=1, progress=False)


def test_same_seed_same_data_same_weights_and_routing():
    runs = []
    for _ in range(2):
        zoo = _zoo(["lora", "mlp"], {"kind": "learned", "top_k": 1, "jitter": 0.1})
        data = tokenize(_domain("p") + _domain("w"), zoo.tokenizer, 32)
        train_expert(zoo, "e0", data, steps=3, lr=1e-2, progress=False)
        train_router(zoo, data, steps=3, lr=1e-2, progress=False)
        with zoo.trace() as trace:
            zoo(input_ids=torch.tensor([data[0].input_ids]))
        runs.append(([p.detach().clone() for p in zoo.parameters() if p.requires_grad], trace.records))
    (w1, r1), (w2, r2) = runs
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert all(torch.equal(a["indices"], b["indices"]) and torch.equal(a["weights"], b["weights"]) for a, b in zip(r1, r2))
