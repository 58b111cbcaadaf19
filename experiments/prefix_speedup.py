"""Training and evaluating experts at upper layers from the cached frozen prefix, against the full forward, on the
real SmolLM2-135M: a rank-16 LoRA expert at the MLP blocks of layers 24-29, batches of 4 x 128 tokens of stdlib code.
Both runs start from the same weights and must reach the same losses; times are medians, interleaved (A B A B).

    .venv/bin/python experiments/prefix_speedup.py      # writes docs/results/prefix-speedup.{json,md}
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers

import expertzoo as ez
from expertzoo.data import load_examples, pad_id
from expertzoo.data.domains import prepare
from expertzoo.data.hidden import prefix_cache
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.training.train import train_expert

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
STEPS, BATCH, MAX_LEN, ROUNDS = 2, 4, 128, 2


def main() -> None:
    torch.set_num_threads(2)
    train_file, _ = prepare("code")
    zoo = ez.build({"base": "smollm2-135m", "sites": ["mlp"], "layers": "24-29",
                    "experts": [{"name": "code", "kind": "lora", "rank": 16, "alpha": 32}]})
    pad = pad_id(zoo.tokenizer)
    data = load_examples(train_file, zoo.tokenizer, max_len=MAX_LEN, limit=STEPS * BATCH)
    start = time.perf_counter()
    cache = prefix_cache(zoo.model, [l.site.layer for l in zoo.layers], data, pad_id=pad, batch_size=BATCH)
    cache_s = time.perf_counter() - start
    initial = [p.detach().clone() for p in zoo.expert_parameters("code")]
    times = {"full": [], "prefix": []}
    losses = {}
    evals = {"full": [], "prefix": []}
    nll = {}
    for _ in range(ROUNDS):
        for name, prefix in (("full", None), ("prefix", cache)):
            with torch.no_grad():
                for p, p0 in zip(zoo.expert_parameters("code"), initial):
                    p.copy_(p0)
            start = time.perf_counter()
            losses[name] = train_expert(zoo, "code", data, steps=STEPS, batch_size=BATCH, lr=1e-3, progress=False,
                                        prefix=prefix)
            times[name].append((time.perf_counter() - start) / STEPS)
            start = time.perf_counter()
            nll[name] = evaluate(zoo, data, pad_id=pad, batch_size=BATCH, progress=False, prefix=prefix)["nll"]
            evals[name].append(time.perf_counter() - start)
    step = {k: statistics.median(v) for k, v in times.items()}
    ev = {k: statistics.median(v) for k, v in evals.items()}
    result = {
        "command": "python experiments/prefix_speedup.py",
        "setup": {"base": "smollm2-135m", "expert": "lora rank 16 at mlp of layers 24-29", "batch": BATCH,
                  "max_len": MAX_LEN, "examples": len(data), "threads": 2, "rounds": ROUNDS},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "machine": platform.processor() or platform.machine()},
        "load_average": os.getloadavg()[0],
        "cache_seconds": cache_s, "cache_layers_skipped": cache.layer,
        "train_step_seconds": step, "train_speedup": step["full"] / step["prefix"],
        "eval_seconds": ev, "eval_speedup": ev["full"] / ev["prefix"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(losses["full"], losses["prefix"])),
        "eval_nll_difference": abs(nll["full"] - nll["prefix"]),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prefix-speedup.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "prefix-speedup.md").write_text(
        "# Experts at upper layers from the cached frozen prefix (SmolLM2-135M, 2 CPU threads)\n\n"
        f"`{result['command']}`; {result['setup']['expert']}, batches of {BATCH} x {MAX_LEN} tokens of stdlib code; "
        f"medians of {ROUNDS} interleaved rounds on a shared 2-core machine (load average {result['load_average']:.1f}).\n\n"
        "| | full forward | from the prefix | speed-up |\n|---|---|---|---|\n"
        f"| train step | {step['full']:.2f} s | {step['prefix']:.2f} s | {result['train_speedup']:.2f}x |\n"
        f"| evaluation of {len(data)} examples | {ev['full']:.2f} s | {ev['prefix']:.2f} s | {result['eval_speedup']:.2f}x |\n\n"
        f"Computing the prefix (layers 0-23) once for the {len(data)} examples: {cache_s:.2f} s. Largest difference of "
        f"a training loss: {result['max_loss_difference']:.1e}; of the evaluation NLL: {result['eval_nll_difference']:.1e}.\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
