#!/usr/bin/env bash
# The benchmark suite on a lent GPU in one run of at most ~10 minutes (shared/BENCHMARKS.md): a check that the
# grouped matmul equals the loop on the device, then the suite with few repeats, each part under its own time limit
# so a slow one cannot eat the rest. Results land in docs/results/bench-*-<device>.{json,md} (and $OUT if set).
# Run on the device machine from the repository root: bash bench/gpu.sh
set -u
PY=${PY:-.venv/bin/python}
export PYTHONPATH=src:.
$PY - <<'CHECK'
import torch
from expertzoo.nn.grouped import grouped_mm, native
x = torch.randn(96, 576, device="cuda", dtype=torch.bfloat16)
w = torch.randn(4, 576, 1536, device="cuda", dtype=torch.bfloat16)
ends = torch.tensor([10, 40, 40, 90], device="cuda", dtype=torch.int32)
got = grouped_mm(x, w, ends).float()
want = torch.zeros(96, 1536, device="cuda")
start = 0
for e, end in enumerate(ends.tolist()):
    want[start:end] = (x[start:end] @ w[e]).float()
    start = end
print("grouped_mm native:", native(x, w), "max abs diff vs loop:", (got - want).abs().max().item(), flush=True)
CHECK
for part in "compiled 240" "overheads 90" "layer 120" "scaling 60" "strategies 40"; do
  set -- $part
  timeout "$2" $PY -m bench --device cuda --only "$1" --reps 3 || echo "bench $1: stopped (exit $?)"
done
if [ -n "${OUT:-}" ]; then cp docs/results/bench-*-h*.* docs/results/bench-*-gpu.* "$OUT"/ 2>/dev/null; fi
