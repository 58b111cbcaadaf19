"""`zoo eval DIR --data NAME=PATH ... [--json OUT]`: NLL, perplexity, load and expert shares per dataset."""
from __future__ import annotations

from rich.table import Table

from ..data import load_examples, parse_named_paths
from ..evaluate import evaluate
from .common import console, is_zoo, load_model, write_json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a zoo (or a base) on data files")
    p.add_argument("dir", help="zoo folder or base spec")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH", help=".txt or .jsonl data files")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example window (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="at most this many examples per dataset, evenly spaced")
    p.set_defaults(run=run)


def run(args) -> int:
    paths = parse_named_paths(args.data)
    model, tok = load_model(args.dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = {name: load_examples(path, tok, args.max_len, args.limit) for name, path in paths.items()}
    results = {name: evaluate(model, ex, pad_id=pad, batch_size=args.batch_size, desc=name) for name, ex in examples.items()}
    zoo = is_zoo(model)
    report = {"base": model.zoo_config.base if zoo else args.dir, "experts": model.expert_names if zoo else [],
              "datasets": results}
    table = Table("dataset", "tokens", "NLL", "ppl", "load", "expert share")
    for name, r in results.items():
        share = "  ".join(f"{k} {v:.0%}" for k, v in r["expert_share"].items())
        table.add_row(name, f"{r['tokens']:,}", f"{r['nll']:.4f}", f"{r['ppl']:.2f}", f"{r['load']:.2f}", share)
    console.print(table)
    if args.json:
        write_json(report, args.json)
    return 0
