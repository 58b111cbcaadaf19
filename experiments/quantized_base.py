"""Held-out NLL, weight memory and peak memory of SmolLM2-135M as a zoo base in float32 and with `quantize: int8`
(torchao weight-only, CPU), with a LoRA expert per MLP block at full precision; each mode in a fresh process.
Data: Python stdlib held-out modules (code) and the odd half of GSM8K (math), 24 windows of 256 tokens each.
Run: .venv/bin/python experiments/quantized_base.py   (writes docs/results/quantized-base.{json,md})"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from expertzoo.data.domains import prepare_code, prepare_math
from expertzoo.io.base_models import cache_dir

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
LIMIT, MAX_LEN = 24, 256
RUN = textwrap.dedent("""
    import json, resource, sys, time, torch
    import expertzoo as ez
    from expertzoo.data import load_examples
    from expertzoo.evaluation.evaluate import evaluate
    from expertzoo.io.quantize import weight_bytes
    torch.set_num_threads(2)
    mode, data, limit, max_len = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    start = time.perf_counter()
    zoo = ez.build({"base": "smollm2-135m", "sites": ["mlp"], "quantize": mode,
                    "experts": [{"name": "code", "kind": "lora", "rank": 8}], "router": {"kind": "fixed", "experts": ["code"]}})
    build_s = time.perf_counter() - start
    out = {"mode": mode, "weight_bytes": weight_bytes(zoo.model), "build_seconds": build_s, "datasets": {}}
    pad = zoo.tokenizer.pad_token_id if zoo.tokenizer.pad_token_id is not None else zoo.tokenizer.eos_token_id
    for name, path in data.items():
        examples = load_examples(path, zoo.tokenizer, max_len=max_len, limit=limit)
        t = time.perf_counter()
        with torch.no_grad():
            r = evaluate(zoo, examples, pad_id=pad, batch_size=4, progress=False)
        out["datasets"][name] = {"nll": r["nll"], "tokens": r["tokens"], "seconds": time.perf_counter() - t}
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out))
""")


def main() -> None:
    data_dir = cache_dir() / "data"
    data = {"code": str(prepare_code(data_dir)[1]), "math": str(prepare_math(data_dir)[1])}
    rows = []
    for mode in ("none", "int8"):
        done = subprocess.run([sys.executable, "-c", RUN, mode, json.dumps(data), str(LIMIT), str(MAX_LEN)],
                              check=True, capture_output=True, text=True, timeout=3600)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "quantized-base.json").write_text(json.dumps(rows, indent=2) + "\n")
    gib = 2 ** 30
    lines = ["# SmolLM2-135M as a zoo base: float32 vs `quantize: int8`", "",
             f"`{' '.join(['python', 'experiments/quantized_base.py'])}`; {LIMIT} windows of {MAX_LEN} tokens per data "
             "set (code: stdlib held-out modules; math: odd half of GSM8K); a fresh rank-8 LoRA expert per MLP block "
             "(float32, zero delta); 2 CPU threads.", "",
             "| base | weights (GiB) | peak RSS (GiB) | code NLL | math NLL | eval seconds (code+math) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        d = r["datasets"]
        lines.append(f"| {r['mode'] if r['mode'] != 'none' else 'float32'} | {r['weight_bytes'] / gib:.3f} | "
                     f"{r['peak_rss_bytes'] / gib:.2f} | {d['code']['nll']:.4f} | {d['math']['nll']:.4f} | "
                     f"{d['code']['seconds'] + d['math']['seconds']:.1f} |")
    lines += ["", "`quantize: int4` (torchao's int4 weight-only, CUDA only) is not measured here: no GPU was lent to the "
                  "sessions that ran this, so the 4-bit path is untested beyond its refusal on a CPU."]
    (RESULTS / "quantized-base.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
