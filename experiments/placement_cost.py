"""What mixed placement costs per forward on the real SmolLM2-135M, against the rectangular zoo of the same experts.

Mixed: a rank-8 LoRA at the MLPs of layers 24-29, an MLP expert (hidden 64) at 18-23, an FFN copy at 12-17 and a
rank-4 LoRA at the q and v projections of 0-5 (30 sites, one expert each). Rectangular: the same four experts at
every site of the union of those sites and layers (mlp, attn.q_proj, attn.v_proj at layers 0-5 and 12-29: 72 sites,
four experts each), which is what a zoo had to be before experts could sit at their own layers. Both route with a
learned top-1 router (randomised so that every expert gets tokens); the mixed zoo is also timed with one global
router, whose decision each site reads through its device index map. Prefill: one forward of 4 x 128 tokens;
decode: the time per new token of greedy generation with the KV cache (batch 1, 16 tokens after a 32-token prompt).
Medians over interleaved rounds on 2 CPU threads.

    .venv/bin/python experiments/placement_cost.py      # writes docs/results/placement-cost.{json,md}
    .venv/bin/python experiments/placement_cost.py --localise   # only the index map's cost per call (printed)
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

import expertzoo as ez

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
ROUNDS, BATCH, SEQ, PROMPT, NEW = 5, 4, 128, 32, 16
ROUTER = {"kind": "learned", "top_k": 1}
EXPERTS = [{"name": "code", "kind": "lora", "rank": 8, "alpha": 16, "layers": "24-29"},
           {"name": "math", "kind": "mlp", "hidden": 64, "layers": "18-23"},
           {"name": "prose", "kind": "ffn", "layers": "12-17"},
           {"name": "chat", "kind": "lora", "rank": 4, "sites": ["attn.q_proj", "attn.v_proj"], "layers": "0-5"}]
UNPLACED = [{k: v for k, v in e.items() if k not in ("sites", "layers")} for e in EXPERTS]
CONFIGS = {
    "mixed": {"base": "smollm2-135m", "sites": ["mlp"], "experts": EXPERTS, "router": ROUTER},
    "mixed, global router": {"base": "smollm2-135m", "sites": ["mlp"], "experts": EXPERTS,
                             "router": {**ROUTER, "scope": "global"}},
    "rectangular": {"base": "smollm2-135m", "sites": ["mlp", "attn.q_proj", "attn.v_proj"], "layers": "0-5,12-29",
                    "experts": UNPLACED, "router": ROUTER},
}


def randomised(zoo) -> None:
    """Router weights drawn at random (every expert gets tokens), expert outputs made non-zero."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in zoo.router_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for p in zoo.expert_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(2)
    models = {"base": ez.load_base("smollm2-135m")[0].eval()}
    for name, cfg in CONFIGS.items():
        zoo = ez.build(cfg).eval()
        randomised(zoo)
        models[name] = zoo
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49152, (BATCH, SEQ), generator=g)
    prompt = torch.randint(0, 49152, (1, PROMPT), generator=g)
    gen = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    prefill: dict[str, list[float]] = {k: [] for k in models}
    decode: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up
            model(input_ids=ids)
        for _ in range(ROUNDS):
            for name, model in models.items():
                prefill[name].append(timed(lambda: model(input_ids=ids)))
                first = timed(lambda: model(input_ids=prompt))
                whole = timed(lambda: model.generate(prompt, **gen))
                decode[name].append((whole - first) / NEW)
    rows = {}
    for name, model in models.items():
        zoo = model if name != "base" else None
        rows[name] = {
            "prefill_s": statistics.median(prefill[name]), "decode_s_per_token": statistics.median(decode[name]),
            "sites": len(zoo.layers) if zoo else 0,
            "expert_modules": sum(len(l.experts) for l in zoo.layers) if zoo else 0,
            "expert_parameters": sum(p.numel() for p in zoo.expert_parameters()) if zoo else 0,
            "routed_expert_flops_per_token": sum(max(e.flops_per_token() for e in l.experts.values())
                                                 for l in zoo.layers) if zoo else 0,
        }
    base = rows["base"]
    for row in rows.values():
        row["prefill_vs_base"] = row["prefill_s"] / base["prefill_s"]
        row["decode_vs_base"] = row["decode_s_per_token"] / base["decode_s_per_token"]
    result = {"command": "python experiments/placement_cost.py", "rounds": ROUNDS, "batch": BATCH, "seq": SEQ,
              "prompt": PROMPT, "new_tokens": NEW, "threads": 2, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "results": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "placement-cost.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    lines = ["# What mixed placement costs per forward (SmolLM2-135M, 2 CPU threads)", "",
             f"`{result['command']}`; prefill = one forward of {BATCH} x {SEQ} tokens, decode = time per new token "
             f"of greedy generation with the KV cache (batch 1, {NEW} tokens after a {PROMPT}-token prompt); medians "
             f"of {ROUNDS} interleaved rounds on a shared 2-core machine. Learned top-1 routers, randomised.", "",
             "| model | sites | expert modules | expert parameters | prefill | vs base | decode / token | vs base |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['sites']} | {r['expert_modules']} | {r['expert_parameters']:,} | "
                     f"{r['prefill_s'] * 1000:.0f} ms | {r['prefill_vs_base']:.2f}x | "
                     f"{r['decode_s_per_token'] * 1000:.1f} ms | {r['decode_vs_base']:.2f}x |")
    (OUT / "placement-cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def localise_cost(tokens: int = 512, k: int = 2) -> float:
    """Microseconds per `ZooLayer.localise` call (a global decision read at a site that lacks one of two experts)."""
    from expertzoo.nn.routing import Routing

    torch.set_num_threads(2)
    zoo = ez.build({"base": "tiny:llama", "router": {"kind": "learned", "top_k": k, "scope": "global"},
                    "experts": [{"name": "a", "kind": "lora", "rank": 4, "layers": [0]},
                                {"name": "b", "kind": "lora", "rank": 4}]})
    layer = zoo.layers[1]  # holds b only
    routing = Routing(weights=torch.rand(tokens, k), indices=torch.randint(0, 2, (tokens, k)))
    for _ in range(50):
        layer.localise(routing)
    runs = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(1000):
            layer.localise(routing)
        runs.append((time.perf_counter() - start) / 1000)
    return statistics.median(runs) * 1e6


if __name__ == "__main__":
    if "--localise" in sys.argv:
        print(f"localise, {512} tokens, top-2: {localise_cost():.1f} us per call")
    else:
        main()
