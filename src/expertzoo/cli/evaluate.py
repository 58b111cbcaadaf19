"""`zoo eval DIR --data NAME=PATH ... [--json OUT] [--label NAME=EXPERT ...] [--force-expert [NAME=]EXPERT ...]`: NLL,
perplexity, load, expert shares and FLOPs saved per dataset; with --label, the share of the dataset's sequences
routed to its expert; `--force-expert NAME=EXPERT` forces EXPERT on dataset NAME only (every oracle in one run)."""
from __future__ import annotations

import contextlib

from ..errors import ZooError
from .common import (add_data, add_dtype, add_prefix_flag, console, is_zoo, load_model, named_paths, pad_id, positive,
                     prefix_for, show, table, write_json)
from .generate import add_steering, router_warnings, steer


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a zoo (or a base) on data files")
    p.add_argument("dir", help="zoo folder or base spec")
    add_data(p, text=".txt or .jsonl data files, each evaluated on its own")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward")
    add_dtype(p)
    p.add_argument("--limit", type=positive, help="at most this many examples per dataset, evenly spaced")
    p.add_argument("--label", nargs="+", action="extend", default=[], metavar="NAME=EXPERT",
                   help="the expert each dataset belongs to: adds routing_accuracy to that dataset's results; "
                        "repeatable")
    add_steering(p, per_dataset=True)
    add_prefix_flag(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..data import load_examples
    from ..evaluation.evaluate import evaluate
    from ..extras.collab import is_collab_folder
    from .collab import evaluate_folder

    paths = named_paths(args.data)
    labels = parse_labels(args.label, paths)
    everywhere, per_dataset = parse_forced(args.force_expert, paths)
    if is_collab_folder(args.dir):  # Co-LLM: NLL of the deferral mixture and the deferral rate
        report = evaluate_folder(args.dir, paths, max_len=args.max_len, limit=args.limit, batch_size=args.batch_size)
        if args.json:
            write_json(report, args.json)
        return 0
    model, tok = load_model(args.dir, args.dtype)
    steer(model, args.dir, args.disable_expert, everywhere)
    for name, forced in per_dataset.items():
        steer(model, args.dir, args.disable_expert, forced, check_only=True)
    router_warnings(model, batch_size=args.batch_size)
    examples = {name: load_examples(path, tok, args.max_len, args.limit) for name, path in paths.items()}
    results = {}
    for name, ex in examples.items():
        with model.force_expert(per_dataset[name]) if name in per_dataset else contextlib.nullcontext():
            results[name] = evaluate(model, ex, pad_id=pad_id(tok), batch_size=args.batch_size, desc=name,
                                     label=labels.get(name), prefix=prefix_for(model, ex, enabled=args.prefix_cache))
        if name in per_dataset:
            results[name]["forced"] = per_dataset[name]
    zoo = is_zoo(model)
    report = {"base": model.zoo_config.base if zoo else args.dir, "experts": model.expert_names if zoo else [],
              "datasets": results}
    out = table("dataset", "tokens", "NLL", "ppl", "load", "expert share")
    for name, r in results.items():
        share = "  ".join(f"{k} {v:.0%}" for k, v in r["expert_share"].items())
        out.add_row(name, f"{r['tokens']:,}", f"{r['nll']:.4f}", f"{r['ppl']:.2f}", f"{r['load']:.2f}", share)
    show(out)
    for name, r in results.items():
        if "routing_accuracy" in r:
            console.print(f"{name}: routing accuracy {r['routing_accuracy']:.1%} (label {labels[name]})")
    if args.json:
        write_json(report, args.json)
    return 0


def parse_forced(items: list[str], datasets: dict[str, str]) -> tuple[list[str], dict[str, list[str]]]:
    """`--force-expert` arguments: NAME (every dataset) or DATASET=NAME (that dataset only; repeated: several
    experts, equal weights) -> (experts forced everywhere, {dataset: experts})."""
    everywhere: list[str] = []
    per_dataset: dict[str, list[str]] = {}
    for item in items:
        name, sep, expert = item.partition("=")
        if not sep:
            everywhere.append(item)
            continue
        if not name or not expert:
            raise ZooError(f"--force-expert {item!r} must look like NAME or DATASET=NAME, e.g. code=code")
        if name not in datasets:
            raise ZooError(f"--force-expert {item!r} names dataset {name!r}, which is not in --data "
                           f"({', '.join(datasets)}); fix the name")
        per_dataset.setdefault(name, []).append(expert)
    return everywhere, per_dataset


def parse_labels(items: list[str], datasets: dict[str, str]) -> dict[str, str]:
    """`--label NAME=EXPERT` arguments to {dataset: expert}; every NAME must be a --data dataset, named once."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, expert = item.partition("=")
        if not sep or not name or not expert:
            raise ZooError(f"--label {item!r} must look like DATASET=EXPERT, e.g. code=code")
        if name not in datasets:
            raise ZooError(f"--label {item!r} names dataset {name!r}, which is not in --data ({', '.join(datasets)}); "
                           "fix the name")
        if name in out:
            raise ZooError(f"--label gives dataset {name!r} twice ({out[name]}, {expert}); keep one")
        out[name] = expert
    return out
