"""`zoo demo`: two experts on SmolLM2-135M, trained on real code and math, router trained, NLL table."""
from __future__ import annotations

from ..demo import DEFAULTS, run_demo
from .common import console


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M (under 10 minutes on 2 cores)")
    for key, text in (("expert_steps", "training steps per expert"), ("router_steps", "router training steps"),
                      ("eval_examples", "held-out windows per domain")):
        p.add_argument(f"--{key.replace('_', '-')}", type=int, default=DEFAULTS[key], help=f"{text} (default {DEFAULTS[key]})")
    p.add_argument("-o", "--out", default="runs/demo-zoo", help="where to save the trained zoo")
    p.set_defaults(run=run)


def run(args) -> int:
    run_demo(expert_steps=args.expert_steps, router_steps=args.router_steps, eval_examples=args.eval_examples,
             out=args.out, console=console)
    return 0
