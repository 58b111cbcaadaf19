"""Scaling benchmark: time and peak memory of a zoo layer at SmolLM2's MLP block as the number of experts grows
(2 to 64) at top-2, for LoRA experts (rank 16) and full-FFN experts. Run: `python -m bench.scaling [--quick]`;
`--probe JSON` measures one case's memory (used in a subprocess)."""
from __future__ import annotations

import json
import sys
from typing import Any

import torch

from bench import common
from bench.models import D_MODEL, ffn_experts, lora_experts, one_layer_base, zoo_layer

FULL = dict(experts=[2, 4, 8, 16, 32, 64], tokens=[1, 64, 512], kinds=["lora", "ffn"], memory_tokens=512)
QUICK = dict(experts=[4, 16, 64], tokens=[1, 64], kinds=["lora"], memory_tokens=0)


def make(kind: str, n_experts: int, device: torch.device):
    experts = lora_experts(n_experts) if kind == "lora" else ffn_experts(n_experts)
    _, layer = zoo_layer(one_layer_base(device), experts=experts, top_k=2)
    with torch.no_grad():
        layer.router.weight.normal_(0.0, D_MODEL ** -0.5)  # even load: N(0,1) logits
    return layer


def forward(layer, x: torch.Tensor):
    def run() -> torch.Tensor:
        with torch.no_grad():
            return layer(x)
    return run


def time_kind(s: common.Settings, device: torch.device, kind: str, grid: dict[str, Any]) -> list[dict[str, Any]]:
    layers = {e: make(kind, e, device) for e in grid["experts"]}
    base = layers[grid["experts"][0]].base_layer
    rows = []
    for n_tokens in grid["tokens"]:
        x = torch.randn(1, n_tokens, D_MODEL, device=device)
        runs = {f"E={e}": forward(layer, x) for e, layer in layers.items()}
        runs["base"] = lambda: base(x)
        reps = s.reps or (7 if s.quick else 21)
        times = common.interleave(runs, reps=reps, warmup=2, sync=common.synchronizer(device),
                                  budget_s=3.0 if s.quick else 30.0)
        ref = "E=4" if "E=4" in runs else f"E={grid['experts'][0]}"
        for e in grid["experts"]:
            rows.append({"kind": kind, "tokens": n_tokens, "experts": e,
                         "ms": common.ms(common.median(times[f"E={e}"])),
                         "vs_4_experts": round(common.paired_ratio(times, f"E={e}", ref), 3),
                         "vs_base": round(common.paired_ratio(times, f"E={e}", "base"), 3),
                         "rounds": len(times[f"E={e}"])})
    return rows


def memory(s: common.Settings, kind: str, grid: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Peak memory per expert count, each in a fresh subprocess; 0 experts = the bare one-layer base."""
    out = {}
    for e in [0, *grid["experts"]]:
        out[e] = common.peak_memory("bench.scaling", {"kind": kind, "experts": e, "tokens": grid["memory_tokens"],
                                                      "threads": s.threads}, s.device)
    return out


def probe(args: dict[str, Any]) -> None:
    """Build one case, run one forward, print peak memory (called in a subprocess by `memory`)."""
    torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    before = common.current_rss_mib()
    x = torch.randn(1, args["tokens"], D_MODEL, device=device)
    with torch.no_grad():
        if args["experts"]:
            make(args["kind"], args["experts"], device)(x)
        else:
            one_layer_base(device).model.layers[0].mlp(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(json.dumps({**common.probe_report(args["device"]), "rss_growth_mib": common.current_rss_mib() - before}))


def run(s: common.Settings) -> dict[str, Any]:
    device = common.setup(s)
    grid = QUICK if s.quick else FULL
    rows = []
    for kind in grid["kinds"]:
        kind_rows = time_kind(s, device, kind, grid)
        mem = memory(s, kind, grid) if grid["memory_tokens"] else {}  # quick runs skip the subprocesses
        key = "cuda_mib" if device.type == "cuda" else "rss_mib"
        for r in kind_rows:
            if mem:
                r["peak_mib"] = round(mem[r["experts"]][key], 1)
                r["peak_over_base_mib"] = round(mem[r["experts"]][key] - mem[0][key], 1)
                r["rss_growth_mib"] = round(mem[r["experts"]].get("rss_growth_mib", 0.0), 1)
        rows += kind_rows
        print(kind_rows, flush=True)
    goals = summarise(rows)
    notes = ["One zoo layer at SmolLM2's MLP block (d=576, FFN 1536), learned router, top-2, even load, forward "
             "without autograd, base included. `vs_4_experts`: median per-round time ratio to the 4-expert layer "
             "(contenders interleaved). Peak memory: a fresh subprocess builds the layer and runs one forward of "
             f"{grid['memory_tokens']} tokens (CPU: ru_maxrss; GPU: max allocated); `peak_over_base` subtracts the "
             "bare one-layer base; `rss_growth` is the process's resident memory after the forward minus before building (the "
             "import-time peak of torch and transformers hides small cases in ru_maxrss)."]
    common.write(s, "scaling", {"goals": goals}, rows, notes)
    return {"rows": rows, "goals": goals}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for kind in sorted({r["kind"] for r in rows}):
        for n_tokens in sorted({r["tokens"] for r in rows if r["kind"] == kind}):
            r = next((r for r in rows if r["kind"] == kind and r["tokens"] == n_tokens and r["experts"] == 64), None)
            if r is not None and any(x["experts"] == 4 for x in rows):
                out.append({"goal": f"64 {kind} experts ≤ 1.1x the time of 4 at top-2, {n_tokens} tokens",
                            "measured": r["vs_4_experts"], "met": r["vs_4_experts"] <= 1.1})
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        probe(json.loads(argv[1]))
        return
    run(common.parse_args(__doc__, argv))


if __name__ == "__main__":
    main()
