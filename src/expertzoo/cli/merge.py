"""`zoo merge --base SPEC --adapters P1 P2 ... --method linear|ties|cat|svd|ties_svd -o OUT`: one PEFT adapter
merged from several (PEFT's add_weighted_adapter), a baseline to compare zoos with; `zoo eval OUT` evaluates it."""
from __future__ import annotations

from .common import add_output, check_output, console

METHODS = ("linear", "ties", "cat", "svd", "ties_svd")  # expertzoo.extras.merge.METHODS (a test keeps them equal)


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge PEFT LoRA adapters into one adapter (linear, TIES, ...)")
    p.add_argument("--base", required=True, help="base spec the adapters were trained on (e.g. smollm2-135m)")
    p.add_argument("--adapters", nargs="+", action="extend", required=True, metavar="DIR",
                   help="PEFT adapter folders; repeatable")
    p.add_argument("--method", default="linear", choices=METHODS,
                   help="PEFT combination type: linear / ties (per factor, one rank), cat (exact weighted sum of the "
                        "deltas), svd / ties_svd (on the deltas, then SVD)")
    p.add_argument("--weights", nargs="+", action="extend", type=float, help="one weight per adapter (default 1/n each)")
    p.add_argument("--density", type=float, default=0.5, help="fraction of values TIES keeps")
    add_output(p, "adapter")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..extras.merge import merge_adapters

    check_output(args.out, force=args.force, marker="adapter_config.json", what="adapter")
    out = merge_adapters(args.base, args.adapters, args.out, method=args.method, weights=args.weights,
                         density=args.density)
    console.print(f"merged {len(args.adapters)} adapters ({args.method}) on {args.base} -> {out}")
    return 0
