"""`zoo fit-router DIR --kind K --data EXPERT=PATH ... -o DIR2`: replace a zoo's router by one built from each
expert's own data (centroid, rnd, phatgoose) or weights (arrow), and save the new zoo. `--add` fits only the
experts named in --data and keeps the fitted state of the rest."""
from __future__ import annotations

from typing import Any

import yaml

from ..data import load_examples, parse_named_paths
from ..errors import ZooError
from ..training.fit import fit_router, unfitted_experts, with_router
from ..routers import ROUTERS
from ..build.load import load
from ..zoo import Zoo, router_sites
from .common import console, processes

SHARED = ("top_k", "granularity", "scope")


def register(sub) -> None:
    fitted = ", ".join(k for k in ROUTERS.names() if ROUTERS.get(k).fit_from)
    p = sub.add_parser("fit-router", help=f"fit a router from each expert's data ({fitted})")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--kind", help=f"router kind: {fitted} (with --add: the zoo's own kind)")
    p.add_argument("--data", nargs="+", default=[], metavar="EXPERT=PATH", help="each expert's own .txt/.jsonl data")
    p.add_argument("-o", "--out", required=True, help="output zoo folder")
    p.add_argument("--add", action="store_true", help="fit only the experts named in --data; keep the others as fitted")
    p.add_argument("--top-k", type=int, help="experts per token (default: the zoo's)")
    p.add_argument("--granularity", choices=["token", "sequence"], help="route tokens or sequence prefixes")
    p.add_argument("--scope", choices=["layer", "global"], help="a router per site, or one for all sites")
    p.add_argument("--option", nargs="+", default=[], metavar="KEY=VALUE", help="router kind options, e.g. temperature=0.1")
    p.add_argument("--max-len", type=int, default=256, help="tokens per example window (default 256)")
    p.add_argument("--limit", type=int, help="at most this many examples per expert, evenly spaced")
    p.add_argument("--max-tokens", type=int, default=20_000, help="router inputs kept per site and expert")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(run=run)


def parse_options(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` pairs; values read as YAML scalars (numbers, booleans, strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ZooError(f"--option {item!r} must look like KEY=VALUE, e.g. temperature=0.1")
        out[key] = yaml.safe_load(value)
    return out


def target_zoo(zoo: Zoo, args) -> Zoo:
    """The zoo to fit: the loaded one (--add) or a copy with a fresh router of --kind."""
    current = zoo.zoo_config.router
    if args.add:
        changed = [f"--{k.replace('_', '-')}" for k in (*SHARED, "option") if getattr(args, k)]
        if args.kind not in (None, current.kind) or changed:
            what = f"--kind {args.kind}" if args.kind not in (None, current.kind) else changed[0]
            raise ZooError(f"--add keeps the zoo's {current.kind} router as it is, so {what} cannot apply; drop it, "
                           "or refit every expert without --add")
        return zoo
    if not args.kind:
        raise ZooError("--kind is missing; name the router kind to fit, e.g. --kind centroid")
    spec = {k: getattr(args, k) if getattr(args, k) is not None else getattr(current, k) for k in SHARED}
    return with_router(zoo, {"kind": args.kind, **spec, **parse_options(args.option)})


def run(args) -> int:
    zoo = target_zoo(load(args.dir), args)
    paths = parse_named_paths(args.data)
    zoo._check_names(list(paths))
    router = router_sites(zoo)[0][0] if zoo.layers else None
    names = list(paths) or (unfitted_experts(zoo) if args.add else None)
    if not args.add and router is not None and router.fit_from not in (None, "weights"):
        missing = [n for n in zoo.expert_names if n not in paths]
        if missing:
            raise ZooError(f"expert {missing[0]!r} has no --data; give {missing[0]}=PATH (or use --add to fit "
                           "only some experts of an already fitted router)")
    data = {name: load_examples(path, zoo.tokenizer, args.max_len, args.limit) for name, path in paths.items()}
    # Launched as several processes, every rank fits the same router (phatgoose's gate training splits each
    # batch among them); the main process alone writes it.
    seconds = fit_router(zoo, data, experts=names, max_tokens=args.max_tokens, batch_size=args.batch_size, progress=True)
    ranks = processes()
    if ranks.is_main_process:
        zoo.save(args.out)
        fitted = ", ".join(f"{n} {s:.1f} s" for n, s in seconds.items())
        console.print(f"fitted {zoo.zoo_config.router.kind} router for {fitted}; {router.flops_per_token():,} "
                      f"FLOPs/token per router, {len(zoo.routers())} routers -> {args.out}")
    ranks.wait_for_everyone()
    return 0
