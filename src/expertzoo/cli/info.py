"""`zoo info DIR`: what a zoo holds: base, sites, experts (kind, sites, parameters, FLOPs per token), router."""
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
    out = table("expert", "kind", "mode", "options", "sites", "parameters", "FLOPs/token")
    for spec in cfg.experts:
        layers_of = zoo.layers_of(spec.name)
        modules = [layer.experts[spec.name] for layer in layers_of]
        params = sum(p.numel() for m in modules for p in m.parameters())
        flops = sum(m.flops_per_token() for m in modules)
        opts = ", ".join(f"{k}={v}" for k, v in spec.options.model_dump().items())
        where = f"{', '.join(dict.fromkeys(l.site.local for l in layers_of))} @ {spans(l.site.layer for l in layers_of)}"
        out.add_row(spec.name, spec.kind, modules[0].mode if modules else "-", opts, where, f"{params:,}", f"{flops:,}")
    show(out)
    return 0


def spans(layers) -> str:
    """Layer indices as ranges: [0, 1, 2, 5] -> '0-2,5'."""
    out: list[list[int]] = []
    for i in sorted(set(layers)):
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in out)
