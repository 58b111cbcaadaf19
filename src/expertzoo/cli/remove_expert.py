"""`zoo remove-expert DIR NAME [NAME ...] -o OUT`: remove experts from a saved zoo (every site where they sit; a
site left without experts gets its original module back) and save the new zoo atomically."""
from __future__ import annotations

from .common import add_output, check_output, console, plural


def register(sub) -> None:
    p = sub.add_parser("remove-expert", help="remove experts from a zoo")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("names", nargs="+", metavar="NAME", help="experts to remove")
    add_output(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.load import load

    check_output(args.out, force=args.force)
    zoo = load(args.dir)
    zoo._check_names(args.names)
    for name in dict.fromkeys(args.names):
        zoo.remove_expert(name)
    zoo.save(args.out)
    console.print(f"removed {', '.join(dict.fromkeys(args.names))}; the zoo has "
                  f"{plural(len(zoo.expert_names), 'expert')} at {plural(len(zoo.layers), 'site')} -> {args.out}")
    return 0
