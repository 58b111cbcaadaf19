"""`zoo demo`: the main job on the embedded SmolLM2-135M. Builds a zoo of two experts (a LoRA for code, an MLP
for math), trains each on its real domain, trains the router, and compares held-out NLL with the base."""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.console import Console
from rich.table import Table

from .io.base_models import DEFAULT_BASE, load_base
from .data import load_examples, pad_id
from .data.domains import prepare
from .evaluation.evaluate import evaluate
from .evaluation.generate import generate, routed_text
from .training.train import train_expert, train_router
from .build.assemble import build

DEMO_CONFIG: dict[str, Any] = {
    "base": DEFAULT_BASE,
    "sites": ["mlp"],
    "layers": "18-29",
    "experts": [
        {"name": "code", "kind": "lora", "rank": 16, "alpha": 32},
        {"name": "math", "kind": "mlp", "hidden": 128},
    ],
    "router": {"kind": "learned", "top_k": 2, "granularity": "sequence"},
}
PROMPTS = {
    "code": ("def is_palindrome(text: str) -> bool:\n", False),
    "math": ("Question: Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples does he have "
             "left?\nAnswer:", False),
}


@contextmanager
def step(console: Console, timings: dict[str, float], name: str) -> Iterator[None]:
    console.rule(f"[bold]{name}")
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    console.print(f"[dim]{name}: {timings[name]:.1f} s[/dim]")


DEFAULTS = {"expert_steps": 30, "router_steps": 20, "eval_examples": 24}


def run_demo(*, expert_steps: int = DEFAULTS["expert_steps"], router_steps: int = DEFAULTS["router_steps"],
             eval_examples: int = DEFAULTS["eval_examples"], max_len: int = 128,
             batch_size: int = 4, out: str | Path = "runs/demo-zoo", console: Console | None = None) -> dict[str, Any]:
    """Run the demo; returns {"results": {domain: {"base": ..., "zoo": ...}}, "timings": {...}}."""
    console = console or Console(highlight=False, emoji=False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    timings: dict[str, float] = {}
    with step(console, timings, "load SmolLM2-135M"):
        model, tok = load_base(DEFAULT_BASE)
    with step(console, timings, "prepare data (stdlib code, GSM8K math)"):
        files = {d: prepare(d) for d in ("code", "math")}
        train = {d: load_examples(f[0], tok, max_len, limit=200) for d, f in files.items()}
        held_out = {d: load_examples(f[1], tok, max_len, limit=eval_examples) for d, f in files.items()}
        console.print("  ".join(f"{d}: {len(train[d])} train / {len(held_out[d])} held-out windows" for d in files))
    zoo = build(DEMO_CONFIG, model=model, tokenizer=tok)
    pad = pad_id(tok)
    for domain in ("code", "math"):
        with step(console, timings, f"train expert {domain} ({expert_steps} steps)"):
            losses = train_expert(zoo, domain, train[domain], steps=expert_steps, lr=2e-3, batch_size=batch_size)
            console.print(f"loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of last 5)")
    with step(console, timings, f"train router ({router_steps} steps)"):
        mixed = [ex for pair in zip(train["code"], train["math"]) for ex in pair]
        losses = train_router(zoo, mixed, steps=router_steps, lr=1e-2, batch_size=batch_size)
        console.print(f"loss {losses[0]:.3f} -> {sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of last 5)")
    results: dict[str, dict[str, Any]] = {}
    with step(console, timings, "evaluate held-out"):
        for domain, examples in held_out.items():
            with zoo.force_expert([]):
                base = evaluate(zoo, examples, pad_id=pad, batch_size=8, desc=f"{domain} base")
            results[domain] = {"base": base, "zoo": evaluate(zoo, examples, pad_id=pad, batch_size=8, desc=f"{domain} zoo")}
    console.print(results_table(results, zoo.expert_names))
    with step(console, timings, "generate"):
        for domain, (prompt, chat) in PROMPTS.items():
            pieces, labels = generate(zoo, tok, prompt, max_new_tokens=48, chat=chat, show_routing=True)
            console.print(f"[bold]{domain} prompt:[/bold] {prompt!r}")
            console.print(routed_text(pieces, labels))
    zoo.save(out)
    console.print(f"zoo saved to {out}: try `zoo info {out}` or `zoo generate {out} --prompt '...' --show-routing`")
    console.print(timings_table(timings))
    return {"results": results, "timings": timings}


def results_table(results: dict[str, dict[str, Any]], names: list[str]) -> Table:
    table = Table("held-out domain", "tokens", "NLL base", "NLL zoo", "change", *[f"weight to {n}" for n in names],
                  title="SmolLM2-135M + zoo of 2 experts (sequence-level learned router, top-2)")
    for domain, r in results.items():
        b, z = r["base"], r["zoo"]
        table.add_row(domain, f"{z['tokens']:,}", f"{b['nll']:.4f}", f"{z['nll']:.4f}",
                      f"{(z['nll'] - b['nll']) / b['nll']:+.1%}", *[f"{z['expert_weight'][n]:.0%}" for n in names])
    return table


def timings_table(timings: dict[str, float]) -> Table:
    table = Table("step", "seconds", title="time per step")
    for name, seconds in timings.items():
        table.add_row(name, f"{seconds:.1f}")
    table.add_row("total", f"{sum(timings.values()):.1f}")
    return table
