"""`zoo prune DIR --data PATH --keep N [--merge] -o DIR2`: keep the N experts most used on the task data (routing
frequency summed over all sites), dropping or merging the rest; prints NLL before and after, saves the pruned zoo
with prune.json (the report) in it."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from ..data import load_examples
from ..extras.prune import prune
from ..build.load import load
from .common import console, write_json


def register(sub) -> None:
    p = sub.add_parser("prune", help="drop (or merge) the experts a task uses least")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--data", required=True, help="task data (.txt or .jsonl) to measure expert usage and NLL on")
    p.add_argument("--keep", type=int, required=True, help="how many experts to keep")
    p.add_argument("--merge", action="store_true", help="merge each dropped expert into the most similar kept one "
                   "of its kind, weighted by usage, instead of dropping it")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--limit", type=int, help="at most this many examples, evenly spaced")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("-o", "--out", required=True, help="output zoo folder")
    p.set_defaults(run=run)


def run(args) -> int:
    zoo = load(args.dir)
    examples = load_examples(args.data, zoo.tokenizer, args.max_len, args.limit)
    report = prune(zoo, examples, keep=args.keep, merge=args.merge, batch_size=args.batch_size)
    zoo.save(args.out)
    write_json({**report, "source": str(args.dir), "data": str(args.data)}, Path(args.out) / "prune.json")
    table = Table("expert", "usage", "fate", title=f"prune to {args.keep} experts on {report['tokens']:,} tokens: "
                  f"NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f}")
    for name, share in sorted(report["usage"].items(), key=lambda kv: -kv[1]):
        fate = "kept" if name in report["kept"] else (f"merged into {report['merged_into'][name]}"
                                                       if report["merged_into"].get(name) else "dropped")
        table.add_row(name, f"{share:.1%}", fate)
    console.print(table)
    console.print(f"pruned zoo -> {args.out}")
    return 0
