"""`zoo eval DIR --data NAME=PATH ... [--json OUT] [--label NAME=EXPERT ...]`: NLL, perplexity, load, expert
shares and FLOPs saved per dataset; with --label, the share of the dataset's sequences routed to its expert."""
from __future__ import annotations

from rich.table import Table

from ..data import load_examples, pad_id, parse_named_paths
from ..errors import ZooError
from ..evaluation.evaluate import evaluate
from ..extras.collab import is_collab_folder
from .collab import evaluate_folder
from .common import console, is_zoo, load_model, write_json
from .generate import add_steering, steer


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a zoo (or a base) on data files")
    p.add_argument("dir", help="zoo folder or base spec")
    p.add_argument("--data", nargs="+", required=True, metavar="NAME=PATH", help=".txt or .jsonl data files")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example window (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, help="at most this many examples per dataset, evenly spaced")
    p.add_argument("--label", nargs="+", default=[], metavar="NAME=EXPERT",
                   help="the expert each dataset belongs to: adds routing_accuracy to that dataset's results")
    add_steering(p)
    p.set_defaults(run=run)


def run(args) -> int:
    paths = parse_named_paths(args.data)
    if is_collab_folder(args.dir):  # Co-LLM: NLL of the deferral mixture and the deferral rate
        report = evaluate_folder(args.dir, paths, max_len=args.max_len, limit=args.limit, batch_size=args.batch_size)
        if args.json:
            write_json(report, args.json)
        return 0
    model, tok = load_model(args.dir)
    steer(model, args.dir, args.disable_expert, args.force_expert)
    pad = pad_id(tok)
    labels = parse_labels(args.label, paths)
    examples = {name: load_examples(path, tok, args.max_len, args.limit) for name, path in paths.items()}
    results = {name: evaluate(model, ex, pad_id=pad, batch_size=args.batch_size, desc=name, label=labels.get(name))
               for name, ex in examples.items()}
    zoo = is_zoo(model)
    report = {"base": model.zoo_config.base if zoo else args.dir, "experts": model.expert_names if zoo else [],
              "datasets": results}
    table = Table("dataset", "tokens", "NLL", "ppl", "load", "expert share")
    for name, r in results.items():
        share = "  ".join(f"{k} {v:.0%}" for k, v in r["expert_share"].items())
        table.add_row(name, f"{r['tokens']:,}", f"{r['nll']:.4f}", f"{r['ppl']:.2f}", f"{r['load']:.2f}", share)
    console.print(table)
    for name, r in results.items():
        if "routing_accuracy" in r:
            console.print(f"{name}: routing accuracy {r['routing_accuracy']:.1%} (label {labels[name]})")
    if args.json:
        write_json(report, args.json)
    return 0


def parse_labels(items: list[str], datasets: dict[str, str]) -> dict[str, str]:
    """`--label NAME=EXPERT` arguments to {dataset: expert}; every NAME must be a --data dataset."""
    out = {}
    for item in items:
        name, sep, expert = item.partition("=")
        if not sep or not name or not expert:
            raise ZooError(f"--label {item!r} must look like DATASET=EXPERT, e.g. code=code")
        if name not in datasets:
            raise ZooError(f"--label {item!r} names dataset {name!r}, which is not in --data ({', '.join(datasets)}); "
                           "fix the name")
        out[name] = expert
    return out
