"""`zoo info DIR`: what a zoo holds: base, sites, experts (kind, parameters, FLOPs per token), router."""
from __future__ import annotations

from .common import console, show, table


def register(sub) -> None:
    p = sub.add_parser("info", help="describe a saved zoo")
    p.add_argument("dir", help="zoo folder")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.load import load

    zoo = load(args.dir)
    cfg = zoo.zoo_config
    layers = sorted({s.layer for s in zoo.sites})
    console.print(f"[bold]base[/bold] {cfg.base}   [bold]sites[/bold] {', '.join(cfg.sites)} "
                  f"({len(zoo.sites)} sites over layers {layers[0]}-{layers[-1]})" if layers else "no sites")
    r = cfg.router
    console.print(f"[bold]router[/bold] {r.kind} top_k={r.top_k} null_experts={r.null_experts} "
                  f"always_on_base={r.always_on_base} granularity={r.granularity} scope={r.scope} {r.options.model_dump() or ''}")
    out = table("expert", "kind", "mode", "options", "parameters", "FLOPs/token")
    for spec in cfg.experts:
        modules = [layer.experts[spec.name] for layer in zoo.layers_of(spec.name)]
        params = sum(p.numel() for m in modules for p in m.parameters())
        flops = sum(m.flops_per_token() for m in modules)
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.model_dump().items())
        out.add_row(spec.name, spec.kind, modules[0].mode, opts, f"{params:,}", f"{flops:,}")
    show(out)
    return 0
