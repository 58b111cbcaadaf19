"""Routers built from data route held-out sequences of four synthetic domains (disjoint byte alphabets) to the
right expert: centroid, rnd and phatgoose from each expert's data, arrow from LoRA experts trained on each domain."""
from __future__ import annotations

import random

import pytest
import torch

import expertzoo
from expertzoo.data import tokenize
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.training.fit import fit_router, with_router
from expertzoo.training.train import train_expert
from helpers import PAD

# Each domain: its own characters and its own separator, so no byte is shared between domains.
DOMAINS = {"lower": ("abcdefghijklmnopqrstuvwxyz", " "), "digits": ("0123456789+-*/=", ","),
           "upper": ("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "_"), "symbols": ("{}[]<>!@#$%^&*()~|", ";")}
NAMES = list(DOMAINS)


def domain_texts(name: str, n: int, seed: int) -> list[str]:
    """`n` documents of 6-10 words of 2-7 characters drawn from the domain's alphabet."""
    chars, sep = DOMAINS[name]
    rng = random.Random(f"{name}/{seed}")
    return [sep.join("".join(rng.choice(chars) for _ in range(rng.randint(2, 7))) for _ in range(rng.randint(6, 10)))
            for _ in range(n)]


def domain_examples(tokenizer, n: int, seed: int) -> dict:
    return {name: tokenize([{"text": t} for t in domain_texts(name, n, seed)], tokenizer) for name in NAMES}


def accuracies(zoo, examples: dict) -> dict[str, float]:
    return {n: evaluate(zoo, ex, pad_id=PAD, label=n, progress=False)["routing_accuracy"] for n, ex in examples.items()}


@pytest.fixture(scope="module")
def trained():
    """A tiny llama with four LoRA experts at layer 0's MLP, each trained briefly on its own domain."""
    model, tok = expertzoo.load_base("tiny:llama")
    zoo = expertzoo.build({"base": "tiny:llama", "layers": [0], "router": {"kind": "uniform"},
                           "experts": [{"name": n, "kind": "lora", "rank": 4} for n in NAMES]}, model=model, tokenizer=tok)
    train, test = domain_examples(tok, 64, seed=0), domain_examples(tok, 32, seed=1)
    torch.set_num_threads(1)
    for name in NAMES:
        losses = train_expert(zoo, name, train[name], steps=60, lr=1e-2, progress=False)
        assert losses[-1] < losses[0] - 0.1  # the expert learned its domain
    return zoo, train, test


@pytest.mark.parametrize("kind", ["centroid", "rnd", "phatgoose", "arrow"])
def test_router_routes_held_out_sequences_to_their_expert(kind, trained):
    zoo, train, test = trained
    fitted = with_router(zoo, {"kind": kind, "top_k": 2})
    seconds = fit_router(fitted, None if kind == "arrow" else train)
    assert set(seconds) == set(NAMES)
    acc = accuracies(fitted, test)
    assert sum(acc.values()) / len(acc) >= 0.95, acc
    assert min(acc.values()) >= 0.85, acc
    assert accuracies(with_router(zoo, {"kind": "uniform"}), test)["symbols"] < 0.5  # the measure is not vacuous


@pytest.mark.parametrize("kind", ["centroid", "rnd"])
@pytest.mark.parametrize("mode", [{"granularity": "sequence"}, {"scope": "global"}], ids=["sequence", "global"])
def test_fitted_at_sequence_granularity_or_global_scope(kind, mode, trained):
    """Every layer mixed; the router sees prefix means (sequence) or routes once for all sites (global)."""
    zoo, train, test = trained
    full = expertzoo.build({**zoo.zoo_config.to_dict(), "layers": "all", "router": {"kind": kind, **mode}})
    seconds = fit_router(full, train)
    assert len(seconds) == len(NAMES)
    assert len(full.routers()) == (1 if mode.get("scope") == "global" else 2)
    acc = accuracies(full, test)
    assert sum(acc.values()) / len(acc) >= 0.95, acc
