"""Layer benchmark: a zoo layer of E full-FFN experts (SmolLM2's SwiGLU shape) against one dense FFN and against
transformers' MixtralSparseMoeBlock holding the same weights and router (hence the same routing); forward and
forward+backward. Run: `python -m bench.layer [--quick] [--device cuda]`."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

from bench import common
from bench.models import D_FFN, D_MODEL, ffn_experts, load_stats, one_layer_base, router_weights, zoo_layer
from expertzoo.nn.routing import RouteInput

FULL = dict(tokens=[1, 8, 64, 512, 2048], experts=[8, 16], top_k=[1, 2], load=["even", "skewed"],
            mode=["forward", "forward+backward"])
QUICK = dict(tokens=[8, 64, 512], experts=[8], top_k=[2], load=["even"], mode=["forward"])


def mixtral_block(layer, top_k: int, device: torch.device) -> MixtralSparseMoeBlock:
    """transformers' block with our experts' weights (gate;up concatenated) and our router's weight."""
    experts = list(layer.experts.values())
    cfg = MixtralConfig(hidden_size=D_MODEL, intermediate_size=D_FFN, num_local_experts=len(experts),
                        num_experts_per_tok=top_k, hidden_act="silu", router_jitter_noise=0.0)
    block = MixtralSparseMoeBlock(cfg).to(device)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        for i, e in enumerate(experts):
            m = e.module
            block.experts.gate_up_proj[i].copy_(torch.cat([m.gate_proj.weight, m.up_proj.weight]))
            block.experts.down_proj[i].copy_(m.down_proj.weight)
    return block


def build(n_experts: int, top_k: int, load: str, device: torch.device):
    """(zoo layer, dense FFN, Mixtral block, input shift) for one case; every module trainable."""
    model = one_layer_base(device)
    dense = copy.deepcopy(model.model.layers[0].mlp).requires_grad_(True)
    _, layer = zoo_layer(model, experts=ffn_experts(n_experts), top_k=top_k)
    w, shift = router_weights(n_experts, D_MODEL, load)
    with torch.no_grad():
        layer.router.weight.copy_(w)
    return layer, dense, mixtral_block(layer, top_k, device), shift.to(device)


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """One forward (no autograd) or forward+backward of `module` on x [1,T,d]; returns the output (or x's grad)."""
    if grad is None:
        def fwd() -> torch.Tensor:
            with torch.no_grad():
                return module(x)
        return fwd
    xg = x.detach().clone().requires_grad_(True)

    def fwd_bwd() -> torch.Tensor:
        module.zero_grad(set_to_none=True)
        xg.grad = None
        module(xg).backward(grad)
        return xg.grad
    return fwd_bwd


def case(s: common.Settings, device: torch.device, built, n_tokens: int, n_experts: int, top_k: int, load: str,
         mode: str) -> dict[str, Any]:
    layer, dense, block, shift = built
    g = torch.Generator(device="cpu").manual_seed(n_tokens)
    x = (torch.randn(1, n_tokens, D_MODEL, generator=g).to(device) + shift)  # [1,T,d]
    grad = torch.randn(1, n_tokens, D_MODEL, generator=g).to(device) if mode != "forward" else None
    ref = copy.copy(layer)  # shares modules and weights; only the dispatch path differs
    ref.reference_dispatch = True
    runs = {"dense": step(dense, x, grad), "zoo": step(layer, x, grad), "zoo_reference": step(ref, x, grad),
            "transformers": step(block, x, grad)}
    want = runs["transformers"]()
    diffs = {n: common.check_close(f"{n} vs transformers ({n_tokens} tokens)", runs[n](), want)
             for n in ("zoo", "zoo_reference")}
    reps = s.reps or (5 if s.quick else 15)
    times = common.interleave(runs, reps=reps, warmup=1 if s.quick else 2, sync=common.synchronizer(device),
                              budget_s=2.0 if s.quick else 8.0)
    with torch.no_grad():
        everyone = torch.ones(n_experts, dtype=torch.bool, device=device)
        stats = load_stats(layer.router(RouteInput(x.reshape(-1, D_MODEL).float(), everyone)).indices, n_experts)
    med = {n: common.median(t) for n, t in times.items()}
    return {"tokens": n_tokens, "experts": n_experts, "top_k": top_k, "load": load, "mode": mode,
            "dense_ms": common.ms(med["dense"]), "zoo_ms": common.ms(med["zoo"]),
            "transformers_ms": common.ms(med["transformers"]), "zoo_reference_ms": common.ms(med["zoo_reference"]),
            "eta_zoo": round(top_k / common.paired_ratio(times, "zoo", "dense"), 3),
            "eta_transformers": round(top_k / common.paired_ratio(times, "transformers", "dense"), 3),
            "zoo_vs_transformers": round(common.paired_ratio(times, "zoo", "transformers"), 3),
            "zoo_vs_reference": round(common.paired_ratio(times, "zoo", "zoo_reference"), 3),
            **stats, "rounds": len(times["zoo"]), "max_abs_diff": max(diffs.values())}


def run(s: common.Settings) -> dict[str, Any]:
    device = common.setup(s)
    grid = QUICK if s.quick else FULL
    rows = []
    for n_experts in grid["experts"]:
        for top_k in grid["top_k"]:
            for load in grid["load"]:
                built = build(n_experts, top_k, load, device)
                for mode in grid["mode"]:
                    for n_tokens in grid["tokens"]:
                        rows.append(case(s, device, built, n_tokens, n_experts, top_k, load, mode))
                        print(rows[-1], flush=True)
    goals = summarise(rows)
    notes = ["η = ideal / measured time, ideal = dense FFN time × top_k (the active-FLOP ratio); ratios are medians "
             "of per-round ratios (contenders interleaved). `zoo_reference` is the plain dispatch path "
             "(`ZooLayer.reference_dispatch`). Routing is identical: our learned router holds the Mixtral gate's "
             "weight, and outputs are checked allclose before timing."]
    common.write(s, "layer", {"goals": goals}, rows, notes)
    return {"rows": rows, "goals": goals}


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's goals, each from the headline rows (8 experts, top-2, even load, forward) unless stated."""
    head = [r for r in rows if r["experts"] == 8 and r["top_k"] == 2 and r["load"] == "even" and r["mode"] == "forward"]
    out = []

    def goal(text: str, values: list[float], ok: Callable[[float], bool]) -> None:
        if values:
            worst = min(values) if ok(float("inf")) else max(values)
            out.append({"goal": text, "measured": round(worst, 3), "met": all(ok(v) for v in values)})

    goal("η ≥ 0.9 at 512+ tokens", [r["eta_zoo"] for r in head if r["tokens"] >= 512], lambda v: v >= 0.9)
    goal("η ≥ 0.6 at 64 tokens", [r["eta_zoo"] for r in head if r["tokens"] == 64], lambda v: v >= 0.6)
    goal("≤ 0.9x transformers' time at ≤ 64 tokens (every case)",
         [r["zoo_vs_transformers"] for r in rows if r["tokens"] <= 64], lambda v: v <= 0.9)
    goal("≤ 1.0x transformers' time at 512+ tokens (every case)",
         [r["zoo_vs_transformers"] for r in rows if r["tokens"] >= 512], lambda v: v <= 1.0)
    return out


def main(argv: list[str] | None = None) -> None:
    run(common.parse_args(__doc__, argv))


if __name__ == "__main__":
    main()
