"""Routing accuracy of the data-built routers on the real SmolLM2-135M and four real domains available offline:
Python stdlib code, GSM8K math, English and French Debian man pages. One LoRA expert per domain (trained briefly),
then centroid, rnd, phatgoose and arrow fitted one expert at a time; sequence-level routing accuracy on held-out
windows, fit time and routing cost of each. Run: .venv/bin/python experiments/router_accuracy.py (14 min on a busy
2-core machine; trained experts are cached, a rerun takes 4 min less). Writes docs/results/router-accuracy.json, .md."""
from __future__ import annotations

import argparse
import json
import platform
import time
import zlib
from pathlib import Path

import torch
import transformers

import expertzoo
from expertzoo.io.atomic import atomic_write_text
from expertzoo.io.base_models import cache_dir
from expertzoo.data import load_examples
from expertzoo.data.domains import prepare
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.build.activations import collect_inputs
from expertzoo.training.fit import fit_router, with_router
from expertzoo.zoo import router_sites
from expertzoo.training.train import train_expert

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
DOMAINS = ("code", "math", "man-en", "man-fr")
ROUTERS = ("centroid", "rnd", "phatgoose", "arrow")


def domain_files() -> dict[str, tuple[Path, Path]]:
    return {d: prepare(d) for d in DOMAINS}


# ---------------------------------------------------------------- the experiment

def param_count(router) -> int:
    return sum(t.numel() for t in [*router.parameters(), *router.buffers()])


def fit(routed, kind: str, train: dict, acts: dict) -> float:
    """Fit every expert's part; centroid and rnd reuse the router inputs collected once. Returns seconds."""
    start = time.perf_counter()
    pairs = router_sites(routed)
    if pairs[0][0].fit_from == "activations":
        for d in DOMAINS:
            for (router, _), a in zip(pairs, acts[d]):
                router.fit(d, a)
    else:
        fit_router(routed, None if kind == "arrow" else train)
    return time.perf_counter() - start


def measure(routed, kind: str, train: dict, test: dict, acts: dict, pad: int) -> dict:
    fit_s = fit(routed, kind, train, acts)
    evals = {d: evaluate(routed, test[d], pad_id=pad, label=d, progress=False) for d in DOMAINS}
    router = router_sites(routed)[0][0]
    accuracy = {d: e["routing_accuracy"] for d, e in evals.items()}
    return {"accuracy": accuracy, "mean_accuracy": sum(accuracy.values()) / len(accuracy),
            "nll": {d: e["nll"] for d, e in evals.items()}, "load": {d: e["load"] for d, e in evals.items()},
            "expert_weight": {d: e["expert_weight"] for d, e in evals.items()},
            "fit_s": fit_s, "routers": len(routed.routers()), "flops_per_token_per_router": router.flops_per_token(),
            "state_per_router": param_count(router), "options": routed.zoo_config.router.to_dict()}


def forced_nll(zoo, test: dict, pad: int) -> dict:
    """Held-out NLL of the base alone and of each domain's own expert forced (the oracle router)."""
    out = {}
    for label, pick in (("base", lambda d: []), ("oracle", lambda d: d)):
        out[label] = {}
        for d in DOMAINS:
            with zoo.force_expert(pick(d)):
                out[label][d] = evaluate(zoo, test[d], pad_id=pad, progress=False)["nll"]
    return out


class Timings(dict):
    """Seconds per phase, printed as each ends."""

    def done(self, name: str, start: float) -> None:
        self[name] = time.perf_counter() - start
        print(f"{name}: {self[name]:.0f} s", flush=True)


def trained_zoo(config: dict, model, tok, train: dict, args) -> tuple:
    """The zoo with its four experts trained, kept in the cache folder (keyed by the settings) for reruns."""
    key = zlib.crc32(json.dumps([config, args.expert_steps, args.expert_lr, args.batch_size, args.max_len,
                                 args.train_examples], sort_keys=True).encode())
    folder = cache_dir() / "runs" / f"router-accuracy-experts-{key:08x}"
    if (folder / "losses.json").is_file():
        return expertzoo.load(folder, model=model, tokenizer=tok), json.loads((folder / "losses.json").read_text())
    zoo = expertzoo.build(config, model=model, tokenizer=tok)
    losses = {}
    for d in DOMAINS:
        curve = train_expert(zoo, d, train[d], steps=args.expert_steps, lr=args.expert_lr, batch_size=args.batch_size,
                             progress=False)
        losses[d] = [curve[0], curve[-1]]
    zoo.save(folder)
    atomic_write_text(folder / "losses.json", json.dumps(losses))
    return zoo, losses


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    timings = Timings()
    start = time.perf_counter()
    model, tok = expertzoo.load_base("smollm2-135m")
    files = domain_files()
    train = {d: load_examples(files[d][0], tok, args.max_len, args.train_examples) for d in DOMAINS}
    test = {d: load_examples(files[d][1], tok, args.max_len, args.test_examples) for d in DOMAINS}
    timings.done("load model and data", start)
    config = {"base": "smollm2-135m", "sites": ["mlp"], "layers": args.layers, "router": {"kind": "uniform"},
              "experts": [{"name": d, "kind": "lora", "rank": 8, "alpha": 16} for d in DOMAINS]}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    start = time.perf_counter()
    zoo, losses = trained_zoo(config, model, tok, train, args)
    timings.done("train 4 LoRA experts (or load them from the cache)", start)
    start = time.perf_counter()
    acts = {d: collect_inputs(zoo, train[d], expert=d, max_tokens=args.max_tokens) for d in DOMAINS}
    timings.done("collect router inputs (4 experts, shared by centroid and rnd)", start)
    start = time.perf_counter()
    results = {"expert_train_nll_first_last": losses, "held_out_nll": forced_nll(zoo, test, pad), "routers": {}}
    timings.done("base and oracle NLL", start)
    for kind in ROUTERS:
        options = {"steps": args.gate_steps, "lr": args.gate_lr, "batch_size": args.batch_size} if kind == "phatgoose" else {}
        start = time.perf_counter()
        routed = with_router(zoo, {"kind": kind, "top_k": 2, **options})
        results["routers"][kind] = measure(routed, kind, train, test, acts, pad)
        timings.done(f"{kind}: fit and evaluate", start)
        print(kind, json.dumps(results["routers"][kind]["accuracy"]), f"fit {results['routers'][kind]['fit_s']:.1f} s",
              flush=True)
        del routed
    results["timings_s"] = dict(timings)
    return results


def machine() -> dict:
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = ["# Routing accuracy of data-built routers on SmolLM2-135M", "",
             f"Four LoRA experts (rank 8) at the MLP of layers {s['layers']}, one per domain, each trained "
             f"{s['expert_steps']} steps (batch {s['batch_size']} x {s['max_len']} tokens) on its own training half. "
             f"Routers fitted one expert at a time from that expert's data ({s['train_examples']} windows each); "
             f"accuracy = share of {s['test_examples']} held-out windows per domain whose most-weighted expert "
             "(routing weight summed over tokens and sites) is the domain's own. top-k 2, token granularity.", "",
             "Domains: `code` (Python stdlib, held-out modules), `math` (GSM8K test set: even problems train, odd "
             "evaluate), `man-en` / `man-fr` (Debian man pages, English section 1 / French, pages held out by a hash "
             "of their name).", "",
             "| router | " + " | ".join(DOMAINS) + " | mean | fit (s) | FLOPs/token/site | state/site | held-out NLL (mean) |",
             "|---|" + "---|" * (len(DOMAINS) + 5)]
    for kind, r in report["results"]["routers"].items():
        nll = sum(r["nll"].values()) / len(r["nll"])
        lines.append(f"| {kind} | " + " | ".join(f"{r['accuracy'][d]:.0%}" for d in DOMAINS) +
                     f" | {r['mean_accuracy']:.1%} | {r['fit_s']:.1f} | {r['flops_per_token_per_router']:,} | "
                     f"{r['state_per_router']:,} | {nll:.3f} |")
    ref = report["results"]["held_out_nll"]
    for label in ("base", "oracle"):
        lines.append(f"| *{label}* | " + " | ".join("" for _ in DOMAINS) +
                     f" | | | | | {sum(ref[label].values()) / len(DOMAINS):.3f} |")
    lines += ["", "Where the weight of the domains below 95% went (share of routing weight, held-out windows):", ""]
    for kind, r in report["results"]["routers"].items():
        for d in DOMAINS:
            if r["accuracy"][d] < 0.95:
                shares = sorted(r["expert_weight"][d].items(), key=lambda kv: -kv[1])
                lines.append(f"- {kind}, {d}: " + ", ".join(f"{e} {w:.0%}" for e, w in shares))
    lines += ["", f"LoRA expert cost for comparison: {report['expert_flops_per_token_per_site']:,} FLOPs/token/site. "
              "Fit times exclude collecting router inputs (centroid and rnd share one collection: "
              f"{report['results']['timings_s']['collect router inputs (4 experts, shared by centroid and rnd)']:.0f} s); "
              f"PHATGOOSE gates: {s['gate_steps']} steps per expert (the paper: 100).", "",
              "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in report["results"]["timings_s"].items()), "",
              f"Machine: {report['machine']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="24-29")
    p.add_argument("--expert-steps", type=int, default=12)
    p.add_argument("--expert-lr", type=float, default=3e-3)
    p.add_argument("--gate-steps", type=int, default=12)
    p.add_argument("--gate-lr", type=float, default=1e-2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=48)
    p.add_argument("--test-examples", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more threads on a busy machine is slower)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report-only", action="store_true", help="rewrite the Markdown from the JSON in --out")
    args = p.parse_args()
    if args.report_only:
        report = json.loads((args.out / "router-accuracy.json").read_text(encoding="utf-8"))
        atomic_write_text(args.out / "router-accuracy.md", markdown(report))
        return
    start = time.perf_counter()
    results = run(args)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    report = {"settings": settings, "results": results, "machine": machine(),
              "expert_flops_per_token_per_site": 2 * 8 * (576 + 576), "total_s": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "router-accuracy.json", json.dumps(report, indent=2, sort_keys=True) + "\n")
    atomic_write_text(args.out / "router-accuracy.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
