"""Gemma 3 270M as a zoo base: held-out NLL of the base, and of a block_lora expert trained by `zoo train-expert`
on Python code (rank 8 on the MLPs of layers 12-17), next to SmolLM2-135M trained the same way; and its answer to
"What is the capital of France?". Data: stdlib training / held-out modules.
Run: .venv/bin/python experiments/gemma3.py   (writes docs/results/gemma3.{json,md}; expert folders in the cache)"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from expertzoo.cli import main as zoo
from expertzoo.data.domains import prepare_code
from expertzoo.io.base_models import cache_dir, load_base

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
STEPS, LIMIT, EVAL_LIMIT, MAX_LEN = 10, 40, 8, 128
BASES = {"gemma3-270m": "12-17", "smollm2-135m": "24-29"}


def answer(base: str) -> str:
    model, tok = load_base(base)
    ids = tok("What is the capital of France?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def main() -> None:
    train, held = prepare_code(cache_dir() / "data")
    rows = {}
    for base, layers in BASES.items():
        out = cache_dir() / "experts" / f"{base}-code-block-lora"
        argv = ["train-expert", "--base", base, "--kind", "block_lora", "--option", "rank=8", "--layers", layers,
                "--data", str(train), "--eval-data", str(held), "--steps", str(STEPS), "--batch-size", "4",
                "--max-len", str(MAX_LEN), "--limit", str(LIMIT), "--eval-limit", str(EVAL_LIMIT), "--lr", "1e-3",
                "-o", str(out)]
        assert zoo(argv) == 0
        m = json.loads((out / "metrics.json").read_text())
        rows[base] = {"layers": layers, "nll_base": m["nll"]["base"], "nll_expert": m["nll"]["expert"],
                      "gain": m["gain"], "eval_tokens": m["eval_tokens"], "seconds": m["train_seconds"],
                      "answer": answer(base)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gemma3.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# Gemma 3 270M next to SmolLM2-135M: a block_lora expert on Python code", "",
             f"`python experiments/gemma3.py`: `zoo train-expert --kind block_lora --option rank=8`, {STEPS} steps of "
             f"4 x {MAX_LEN} tokens from {LIMIT} stdlib training windows, lr 1e-3; held-out NLL on {EVAL_LIMIT} windows of "
             "held-out stdlib modules; greedy answer to \"What is the capital of France?\".", "",
             "| base | layers | held-out tokens | base NLL | expert NLL | gain | answer |", "|---|---|---|---|---|---|---|"]
    for base, r in rows.items():
        lines.append(f"| {base} | {r['layers']} | {r['eval_tokens']} | {r['nll_base']:.4f} | {r['nll_expert']:.4f} | "
                     f"{r['gain']:.4f} | {r['answer'].strip()!r} |")
    (RESULTS / "gemma3.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
