"""Expert kinds on SmolLM2-135M and GSM8K math: `zoo train-expert` for LoRA, MLP and FFN experts (short runs), then a
DiT expert distilled from the LoRA expert; held-out NLL of base and each expert, training times, and the DiT's cost
(FLOPs/token, measured forward time) against its teacher. Trained experts go to runs/expert-kinds (not in git).
Run: .venv/bin/python experiments/expert_kinds.py [--reuse]  ->  docs/results/expert-kinds.json and expert-kinds.md"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import transformers

import expertzoo as ez
from expertzoo.io.atomic import atomic_write_text
from expertzoo.cli import main as zoo_main
from expertzoo.data import load_examples
from expertzoo.data.domains import prepare

ROOT = Path(__file__).resolve().parents[1]
RUNS, RESULTS = ROOT / "runs" / "expert-kinds", ROOT / "docs" / "results"
LAYERS, STEPS, BATCH, MAX_LEN, TRAIN_LIMIT, EVAL_LIMIT, THREADS = "24-29", 30, 4, 128, 200, 16, 1
KINDS: dict[str, list[str]] = {  # kind -> extra train-expert arguments
    "lora": ["--option", "rank=16", "--option", "alpha=32", "--lr", "2e-3"],
    "mlp": ["--option", "hidden=128", "--lr", "2e-3"],
    "ffn": ["--lr", "3e-4"],
    "dit": ["--teacher", str(RUNS / "lora"), "--steps", "0", "--distill-steps", "300", "--distill-lr", "2e-3",
            "--distill-tokens", "4096"],
}


def train(kind: str, reuse: bool) -> dict[str, Any]:
    out = RUNS / kind
    if not (reuse and (out / "metrics.json").is_file()):
        args = ["train-expert", "--base", "smollm2-135m", "--kind", kind, "--data", str(prepare("math")[0]),
                "--eval-data", str(prepare("math")[1]), "--layers", LAYERS, "--steps", str(STEPS), "--batch-size",
                str(BATCH), "--max-len", str(MAX_LEN), "--limit", str(TRAIN_LIMIT), "--eval-limit", str(EVAL_LIMIT),
                *KINDS[kind], "--force", "-o", str(out)]
        if zoo_main(args) != 0:
            raise SystemExit(f"zoo {' '.join(args)} failed")
    return json.loads((out / "metrics.json").read_text())


def forward_times(repeats: int = 5) -> dict[str, float]:
    """Median seconds of one 1 x 128-token forward with every token forced to the base, the LoRA, the DiT (interleaved)."""
    model, tok = ez.load_base("smollm2-135m")
    zoo = ez.build({"base": "smollm2-135m", "layers": LAYERS, "router": {"kind": "fixed", "experts": []},
                    "experts": [{"name": k, "kind": k, "from": str(RUNS / k)} for k in ("lora", "dit")]},
                   model=model, tokenizer=tok)
    ids = torch.tensor([load_examples(prepare("math")[1], tok, MAX_LEN, limit=1)[0].input_ids[:MAX_LEN]])
    times: dict[str, list[float]] = {"base": [], "lora": [], "dit": []}
    with torch.no_grad():
        for i in range(repeats + 1):
            for name in times:
                with zoo.force_expert([] if name == "base" else name):
                    start = time.perf_counter()
                    zoo(input_ids=ids)
                    if i:  # the first round warms up
                        times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def markdown(rows: dict[str, dict[str, Any]], times: dict[str, float]) -> str:
    base = rows["lora"]["nll"]["base"]
    dit = rows["dit"]
    lines = ["# Expert kinds on SmolLM2-135M, GSM8K math", "",
             f"Each expert sits at the MLP blocks of layers {LAYERS} (6 sites) of SmolLM2-135M-Instruct (fp32, base "
             f"frozen), trained with `zoo train-expert` for {STEPS} steps of {BATCH} x {MAX_LEN} tokens (the first "
             f"{TRAIN_LIMIT} windows of GSM8K's training half: even-numbered problems of the test set), evaluated on "
             f"{EVAL_LIMIT} problems of the evaluation half (odd-numbered; loss on the answer only: "
             f"{rows['lora']['eval_tokens']} tokens). The DiT is distilled from the LoRA expert's deltas "
             f"({dit['distill']['tokens_per_site']} tokens per site, {dit['distill']['steps']} denoising steps, no "
             f"LM-loss steps). Short runs on a shared 2-core CPU ({THREADS} torch thread; other jobs were running, so wall "
             "times are noisy): the numbers show that every kind trains and what it costs, not how far each kind can "
             "go (no tuning; one seed).", "",
             "| expert | options | held-out NLL | change vs base | parameters | FLOPs/token (6 sites) | training wall time (s) |",
             "|---|---|---|---|---|---|---|",
             f"| base | - | {base:.4f} | - | - | - | - |"]
    for kind, m in rows.items():
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "a trainable copy of the MLP block"
        seconds = sum(m["train_seconds"].values())
        lines.append(f"| {kind} | {opts} | {m['nll']['expert']:.4f} | {m['nll']['expert'] - m['nll']['base']:+.4f} | "
                     f"{m['parameters']:,} | {m['flops_per_token']:,} | {seconds:.0f} |")
    t = dit["teacher"]
    lines += ["", "## The DiT against its teacher (the LoRA expert)", "",
              f"- recovers {dit['recovery']:.0%} of the teacher's held-out gain (teacher {dit['nll']['teacher']:.4f}, "
              f"DiT {dit['nll']['expert']:.4f}, base {dit['nll']['base']:.4f});",
              f"- relative squared error of its deltas against the teacher's (on the distillation tokens): "
              f"{dit['distill']['rel_error']:.3f}; denoising loss {dit['distill']['loss_first']:.3f} -> "
              f"{dit['distill']['loss_last']:.3f};",
              f"- FLOPs per token: {dit['flops_per_token']:,} vs {t['flops_per_token']:,} "
              f"({dit['flops_per_token'] / t['flops_per_token']:.0f}x; K = {dit['options']['sample_steps']} DDIM steps, "
              f"each a {dit['options']['depth']}-block transformer over {dit['options']['patches']} patches of width "
              f"{dit['options']['width']}); parameters {dit['parameters']:,} vs {t['parameters']:,};",
              f"- forward of 1 x {MAX_LEN} tokens, every token forced to the expert: base {times['base']:.3f} s, "
              f"LoRA {times['lora']:.3f} s, DiT {times['dit']:.3f} s (DiT adds {times['dit'] - times['base']:.3f} s, the "
              f"LoRA {times['lora'] - times['base']:.3f} s; median of 5, interleaved);",
              f"- for scale: the FFN expert costs {rows['ffn']['flops_per_token']:,} FLOPs per token, so this DiT costs "
              f"{dit['flops_per_token'] / rows['ffn']['flops_per_token']:.2f}x a full FFN copy while imitating a LoRA;",
              f"- distillation took {dit['distill']['seconds']:.0f} s (collecting the teacher's deltas included)."]
    lines += ["", f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} cores."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reuse", action="store_true", help="keep experts already trained in runs/expert-kinds")
    parser.add_argument("--report", action="store_true", help="only rewrite the Markdown from expert-kinds.json")
    args = parser.parse_args()
    if args.report:
        saved = json.loads((RESULTS / "expert-kinds.json").read_text())
        atomic_write_text(RESULTS / "expert-kinds.md", markdown(saved["experts"], saved["forward_seconds"]))
        return
    torch.set_num_threads(THREADS)
    rows = {kind: train(kind, args.reuse) for kind in KINDS}
    times = forward_times()
    atomic_write_text(RESULTS / "expert-kinds.json", json.dumps({"experts": rows, "forward_seconds": times,
                                                                 "layers": LAYERS, "threads": THREADS}, indent=2) + "\n")
    atomic_write_text(RESULTS / "expert-kinds.md", markdown(rows, times))
    print(markdown(rows, times))


if __name__ == "__main__":
    main()
