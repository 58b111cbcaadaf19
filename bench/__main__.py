"""Run the benchmark suite: `python -m bench [--quick] [--device cuda] [--only layer,e2e]` (`make bench`). Each
benchmark writes docs/results/bench-<name>-<tag>.{json,md}; this adds bench-summary-<tag>.{json,md}, every goal
with its measured ratio, met or missed."""
from __future__ import annotations

import json
import time

from bench import common, compiled, e2e, layer, overheads, scaling, strategies

SUITE = {"layer": layer, "e2e": e2e, "scaling": scaling, "overheads": overheads, "strategies": strategies,
         "compiled": compiled}


def main() -> None:
    ap = common.parser(__doc__)
    ap.add_argument("--only", default=",".join(SUITE), help=f"comma-separated subset of {', '.join(SUITE)}")
    args = ap.parse_args()
    unknown = [name for name in args.only.split(",") if name not in SUITE]
    if unknown:
        ap.error(f"--only: no benchmark {unknown[0]!r}; choose from {', '.join(SUITE)}")
    s = common.settings(args)
    took = {}
    for name in args.only.split(","):
        start = time.perf_counter()
        print(f"== bench {name} ({'quick' if s.quick else 'full'}, {s.device}, {s.threads} threads)", flush=True)
        SUITE[name].run(s)
        took[name] = round(time.perf_counter() - start, 1)
    write_summary(s, took)


def write_summary(s: common.Settings, took: dict[str, float]) -> None:
    """Every goal of the latest result file of each benchmark for this tag (a `--only` run keeps the others)."""
    goals, runs = [], {}
    for name in SUITE:
        path = s.out / f"bench-{name}-{s.tag}.json"
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            goals += [{"benchmark": name, **g} for g in doc.get("goals", [])]
            m = doc["machine"]
            runs[name] = f"{m.get('gpu') or m['cpu']}, {m['threads']} threads, load {m['load_avg'][0]:.1f}"
    stem = s.out / f"bench-summary-{s.tag}"
    doc = {"machine": common.machine(s), "goals": goals, "runs": runs, "seconds": took}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    lines = [f"# Benchmark goals ({s.tag})", "", "| benchmark | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {g['benchmark']} | {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'NO'} |" for g in goals]
    lines += ["", "Runs: " + "; ".join(f"{k}: {v}" for k, v in runs.items()) + ".",
              f"Seconds of the last run: {took}. Details: bench-<name>-{s.tag}.md beside this file."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
