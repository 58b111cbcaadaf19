"""`zoo demo`: two experts on SmolLM2-135M, trained on real code and math, router trained, NLL table."""
from __future__ import annotations

from .common import console


def register(sub) -> None:
    p = sub.add_parser("demo", help="the main job on the embedded SmolLM2-135M (about 5-10 minutes on 2 cores)")
    p.add_argument("--expert-steps", type=int, default=40, help="training steps per expert (default 40)")
    p.add_argument("--router-steps", type=int, default=30, help="router training steps (default 30)")
    p.add_argument("--eval-examples", type=int, default=32, help="held-out windows per domain (default 32)")
    p.add_argument("-o", "--out", default="runs/demo-zoo", help="where to save the trained zoo")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import run_demo

    run_demo(expert_steps=args.expert_steps, router_steps=args.router_steps, eval_examples=args.eval_examples,
             out=args.out, console=console)
    return 0
