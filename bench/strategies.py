"""LoRA strategy benchmark: the three ways the LoRA kind (experts/lora.py) runs same-shape LoRA experts (gathered
per slot, dense over every adapter, one slice per adapter) timed against each other over tokens and experts, with
the one the kind picks.
Run: `python -m bench.strategies [--quick]`."""
from __future__ import annotations

from typing import Any

import torch

from bench import common
from expertzoo.experts import lora

FULL = dict(experts=[4, 8, 16, 64], tokens=[1, 4, 16, 64, 256, 1024, 4096], rank=16, d=576, k=2)
QUICK = dict(experts=[8, 64], tokens=[1, 64], rank=16, d=576, k=2)


def case(s: common.Settings, device: torch.device, n_tokens: int, n_experts: int, g: dict[str, Any]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(n_tokens * 131 + n_experts)
    r, d, k = g["rank"], g["d"], g["k"]
    a = (torch.randn(n_experts, r, d, generator=gen) * d ** -0.5).to(device)  # [E,r,d_in]
    b = (torch.randn(n_experts, r, d, generator=gen) * r ** -0.5).to(device)  # [E,r,d_out]: B^T
    x = torch.randn(n_tokens, d, generator=gen).to(device)
    idx = torch.stack([torch.randperm(n_experts, generator=gen)[:k] for _ in range(n_tokens)]).to(device)  # [T,k]
    coef = torch.softmax(torch.randn(n_tokens, k, generator=gen), -1).to(device)
    zero = torch.zeros(n_tokens, d, device=device)
    runs = {"gathered": lambda: lora.lora_gathered(x, idx, coef, a, b),
            "dense": lambda: lora.lora_dense(x, idx, coef, a, b),
            "slices": lambda: lora.lora_slices(zero.clone(), x, idx, coef, a, b)}
    with torch.no_grad():
        want = runs["slices"]()
        for name in ("gathered", "dense"):
            common.check_close(f"{name} vs slices", runs[name](), want)
        times = common.interleave(runs, reps=s.reps or (5 if s.quick else 15), warmup=2,
                                  sync=common.synchronizer(device), budget_s=1.0 if s.quick else 5.0)
    med = {n: common.median(t) for n, t in times.items()}
    best = min(med, key=med.get)
    choice = lora.lora_strategy(n_tokens, k, n_experts, r, d, d, device)
    return {"experts": n_experts, "tokens": n_tokens, **{f"{n}_us": round(v * 1e6, 1) for n, v in med.items()},
            "fastest": best, "picked": choice, "picked_vs_fastest": round(med[choice] / med[best], 3)}


def run(s: common.Settings) -> dict[str, Any]:
    device = common.setup(s)
    g = QUICK if s.quick else FULL
    rows = [case(s, device, t, e, g) for e in g["experts"] for t in g["tokens"]]
    notes = [f"Rank {g['rank']}, d_in = d_out = {g['d']}, top-{g['k']}, one group of same-shape LoRA experts, no "
             "autograd; `picked` is what experts/lora.py chooses (`lora_strategy`), `picked_vs_fastest` its median time over the fastest one's."]
    common.write(s, "strategies", {}, rows, notes)
    return {"rows": rows, "goals": []}


def main(argv: list[str] | None = None) -> None:
    run(common.parse_args(__doc__, argv))


if __name__ == "__main__":
    main()
