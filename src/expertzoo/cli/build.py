"""`zoo build CONFIG -o DIR`: build a zoo from a YAML config and save it."""
from __future__ import annotations

from .common import add_output, check_output, console, plural


def register(sub) -> None:
    p = sub.add_parser("build", help="build a zoo from a YAML config and save it")
    p.add_argument("config", help="YAML zoo config (base, sites, layers, experts, router)")
    add_output(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.assemble import build
    from ..config import load_config

    config = load_config(args.config)  # a bad config or output is refused before the base is loaded
    check_output(args.out, force=args.force)
    zoo = build(config)
    zoo.save(args.out)
    n = sum(t.numel() for t in zoo.zoo_state_dict().values())
    console.print(f"built zoo on {zoo.zoo_config.base}: {plural(len(zoo.expert_names), 'expert')} at "
                  f"{plural(len(zoo.sites), 'site')}, {plural(n, 'added parameter')} -> {args.out}")
    return 0
