"""`zoo merge --base SPEC --adapters P1 P2 ... --method linear|ties|cat|svd|ties_svd -o OUT`: one PEFT adapter
merged from several (PEFT's add_weighted_adapter), a baseline to compare zoos with; `zoo eval OUT` evaluates it."""
from __future__ import annotations

from ..extras.merge import METHODS, merge_adapters
from .common import console


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge PEFT LoRA adapters into one adapter (linear, TIES, ...)")
    p.add_argument("--base", required=True, help="base spec the adapters were trained on (e.g. smollm2-135m)")
    p.add_argument("--adapters", nargs="+", required=True, metavar="DIR", help="PEFT adapter folders")
    p.add_argument("--method", default="linear", choices=METHODS,
                   help="PEFT combination type: linear / ties (per factor, one rank), cat (exact weighted sum of the "
                        "deltas), svd / ties_svd (on the deltas, then SVD); default linear")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1/n each)")
    p.add_argument("--density", type=float, default=0.5, help="fraction of values TIES keeps (default 0.5)")
    p.add_argument("-o", "--out", required=True, help="output adapter folder")
    p.set_defaults(run=run)


def run(args) -> int:
    out = merge_adapters(args.base, args.adapters, args.out, method=args.method, weights=args.weights,
                         density=args.density)
    console.print(f"merged {len(args.adapters)} adapters ({args.method}) on {args.base} -> {out}")
    return 0
