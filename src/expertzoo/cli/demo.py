"""`zoo demo`: two experts on SmolLM2-135M, trained on real code and math, router trained, NLL table."""
from __future__ import annotations

from .common import console, positive

DEFAULTS = {"expert_steps": 30, "router_steps": 20, "eval_examples": 24}  # run_demo's own (a test keeps them equal)


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M (under 10 minutes on 2 cores)")
    for key, text in (("expert_steps", "training steps per expert"), ("router_steps", "router training steps"),
                      ("eval_examples", "held-out windows per domain")):
        p.add_argument(f"--{key.replace('_', '-')}", type=positive, default=DEFAULTS[key], help=text)
    p.add_argument("-o", "--out", default="runs/demo-zoo", help="where to save the trained zoo")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(expert_steps=args.expert_steps, router_steps=args.router_steps, eval_examples=args.eval_examples,
             out=args.out, console=console)
    return 0
