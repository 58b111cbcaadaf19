"""`zoo prune DIR --data PATH --keep N [--merge] [--per-site] -o DIR2`: keep the N experts most used on the task data
(routing frequency summed over all sites; with --per-site, the N most used at each site, UNCURL per layer), dropping
or merging the rest; prints NLL before and after, saves the pruned zoo with prune.json (the report) in it."""
from __future__ import annotations

from pathlib import Path

from .common import (add_data, add_output, check_output, console, load_data, named_paths, positive, show,
                     table, write_json)


def register(sub) -> None:
    p = sub.add_parser("prune", help="drop (or merge) the experts a task uses least")
    p.add_argument("dir", help="zoo folder")
    add_data(p, text="task data (.txt or .jsonl) to measure expert usage and NLL on, mixed into one set")
    p.add_argument("--keep", type=positive, required=True, help="how many experts to keep (at least 1)")
    p.add_argument("--merge", action="store_true", help="merge each dropped expert into the most similar kept one "
                   "of its kind, weighted by usage, instead of dropping it")
    p.add_argument("--per-site", action="store_true", help="keep the N experts most used at each site (an expert "
                   "stays where it is used and goes where it is not) instead of N for the whole zoo")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--limit", type=positive, help="at most this many examples per file, evenly spaced")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward")
    add_output(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.load import load
    from ..extras.prune import prune

    paths = named_paths(args.data)
    check_output(args.out, force=args.force)
    zoo = load(args.dir)
    examples = load_data(paths, zoo.tokenizer, args.max_len, args.limit)
    report = prune(zoo, examples, keep=args.keep, merge=args.merge, per_site=args.per_site, batch_size=args.batch_size)
    zoo.save(args.out)
    data = [str(p) for p in paths.values()]
    write_json({**report, "source": str(args.dir), "data": data[0] if len(data) == 1 else data},
               Path(args.out) / "prune.json")
    where = " per site" if args.per_site else ""
    out = table("expert", "usage", "fate", title=f"prune to {args.keep} experts{where} on {report['tokens']:,} "
                f"tokens: NLL {report['nll_before']:.4f} -> {report['nll_after']:.4f}")
    for name, share in sorted(report["usage"].items(), key=lambda kv: -kv[1]):
        out.add_row(name, f"{share:.1%}", site_fate(report, name) if args.per_site else fate(report, name))
    show(out)
    console.print(f"pruned zoo -> {args.out}")
    return 0


def fate(report: dict, name: str) -> str:
    if name in report["kept"]:
        return "kept"
    return f"merged into {report['merged_into'][name]}" if report["merged_into"].get(name) else "dropped"


def site_fate(report: dict, name: str) -> str:
    """`kept at 3 of 6 sites (merged into x at 2)` for per-site pruning."""
    sites = [d for d in report["sites"].values() if name in d["kept"] or name in d["dropped"]]
    kept = sum(name in d["kept"] for d in sites)
    merged = sum(bool(d["merged_into"].get(name)) for d in sites)
    return f"kept at {kept} of {len(sites)} sites" + (f" (merged at {merged})" if merged else "")
