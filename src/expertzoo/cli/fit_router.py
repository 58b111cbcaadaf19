"""`zoo fit-router DIR --kind K --data EXPERT=PATH ... -o DIR2`: replace a zoo's router by one built from each
expert's own data (centroid, rnd, phatgoose) or weights (arrow), and save the new zoo. `--add` fits only the
experts named in --data and keeps the fitted state of the rest."""
from __future__ import annotations

from typing import Any

from ..errors import ZooError
from .common import add_data, add_output, check_output, console, key_values, named_paths, positive, processes

SHARED = ("top_k", "granularity", "scope")
FITTED_KINDS = ("arrow", "centroid", "phatgoose", "rnd", "rnd_lowrank")  # the router kinds with `fit_from` (a test keeps them equal)


def register(sub) -> None:
    fitted = ", ".join(FITTED_KINDS)
    p = sub.add_parser("fit-router", help=f"fit a router from each expert's data ({fitted})")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--kind", help=f"router kind: {fitted} (with --add: the zoo's own kind)")
    add_data(p, required=False, text="each expert's own .txt/.jsonl data, NAME being the expert")
    add_output(p)
    p.add_argument("--add", action="store_true", help="fit only the experts named in --data; keep the others as fitted")
    p.add_argument("--top-k", type=positive, help="experts per token (default: the zoo's)")
    p.add_argument("--granularity", choices=["token", "sequence"], help="route tokens or sequence prefixes")
    p.add_argument("--scope", choices=["layer", "global"], help="a router per site, or one for all sites")
    p.add_argument("--option", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="router kind options, e.g. temperature=0.1; repeatable")
    p.add_argument("--max-len", type=positive, default=256, help="tokens per example window")
    p.add_argument("--limit", type=positive, help="at most this many examples per expert, evenly spaced")
    p.add_argument("--max-tokens", type=positive, default=20_000, help="router inputs kept per site and expert")
    p.add_argument("--batch-size", type=positive, default=8, help="sequences per forward while collecting")
    p.set_defaults(run=run)


def target_zoo(zoo: Any, args, options: dict[str, Any]) -> Any:
    """The zoo to fit: the loaded one (--add) or a copy with a fresh router of --kind."""
    from ..training.fit import with_router

    current = zoo.zoo_config.router
    if args.add:
        return zoo
    spec = {k: getattr(args, k) if getattr(args, k) is not None else getattr(current, k) for k in SHARED}
    return with_router(zoo, {"kind": args.kind, **spec, **options})


def check_flags(args) -> None:
    """What the flags alone decide, before the zoo is loaded."""
    if args.add:
        changed = [f"--{k.replace('_', '-')}" for k in (*SHARED, "option") if getattr(args, k)]
        if changed:
            raise ZooError(f"--add keeps the zoo's router as it is, so {changed[0]} cannot apply; drop it, "
                           "or refit every expert without --add")
    elif not args.kind:
        raise ZooError("--kind is missing; name the router kind to fit, e.g. --kind centroid")


def run(args) -> int:
    from ..build.load import load
    from ..data import load_examples
    from ..routers import ROUTERS
    from ..training.fit import fit_router, unfitted_experts
    from ..zoo import router_sites

    check_flags(args)
    paths = named_paths(args.data)
    options = key_values(args.option, "--option", "temperature=0.1")
    if args.kind:
        ROUTERS.get(args.kind)  # an unknown kind is refused before the zoo is loaded
    check_output(args.out, force=args.force)
    zoo = load(args.dir)
    if args.add and args.kind not in (None, zoo.zoo_config.router.kind):
        raise ZooError(f"--add keeps the zoo's {zoo.zoo_config.router.kind} router as it is, so --kind {args.kind} "
                       "cannot apply; drop it, or refit every expert without --add")
    zoo = target_zoo(zoo, args, options)
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
