"""`zoo build CONFIG -o DIR`: build a zoo from a YAML config and save it."""
from __future__ import annotations

from ..build.assemble import build
from .common import console


def register(sub) -> None:
    p = sub.add_parser("build", help="build a zoo from a YAML config and save it")
    p.add_argument("config", help="YAML zoo config (base, sites, layers, experts, router)")
    p.add_argument("-o", "--out", required=True, help="output zoo folder")
    p.set_defaults(run=run)


def run(args) -> int:
    zoo = build(args.config)
    zoo.save(args.out)
    n = sum(t.numel() for t in zoo.zoo_state_dict().values())
    console.print(f"built zoo on {zoo.zoo_config.base}: {len(zoo.expert_names)} experts at {len(zoo.sites)} sites, "
                  f"{n:,} added parameters -> {args.out}")
    return 0
