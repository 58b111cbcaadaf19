"""Fitting routers built from data, one expert at a time: collect an expert's router inputs by running the zoo
with hooks (every token forced to that expert, or to the base), then fit from them (centroid, rnd), read the
expert's weights (arrow), or train its gate vectors with everything else frozen (phatgoose). Expert i's part
reads only expert i's data and weights."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from ..build.activations import collect_inputs, router_inputs
from ..build.assemble import build
from ..data import Example
from ..errors import ZooError
from ..registry import ROUTERS
from ..routers.base import CAPABILITIES, FitsFromActivations, FitsFromGates, FitsFromWeights
from ..zoo import Zoo, router_sites
from .train import fit as train_params


# ---------------------------------------------------------------- one fitter per way of fitting (Router.fit_from)

def _fit_activations(zoo: Zoo, name: str, examples: list[Example], settings: dict[str, Any]) -> None:
    pairs = router_sites(zoo)
    acts = collect_inputs(zoo, examples, expert=None if settings["collect"] == "base" else name,
                          pool=pairs[0][0].fit_pool, max_tokens=settings["max_tokens"], batch_size=settings["batch_size"],
                          progress=settings["progress"], desc=f"inputs {name}")
    router: FitsFromActivations
    for (router, _), a in zip(pairs, acts):
        if name not in router.expert_names:  # a site where the expert does not sit
            continue
        if a.shape[0] == 0:
            raise ZooError(f"expert {name!r}: its data gave no tokens to fit on; give it a non-empty data file")
        router.fit(name, a.to(zoo.device))


def _fit_weights(zoo: Zoo, name: str, examples: list[Example] | None, settings: dict[str, Any]) -> None:
    router: FitsFromWeights
    for router, layer in router_sites(zoo):
        if name in layer.experts:
            router.fit_weights(name, layer.experts[name])


@contextlib.contextmanager
def gates_applied(zoo: Zoo, gates: dict[str, torch.Tensor]) -> Iterator[None]:
    """While inside, a forced expert's output at site s is scaled by sigmoid(v_s . router input)."""
    granularity = zoo.zoo_config.router.granularity

    def gate(v: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda x: torch.sigmoid(router_inputs(x, zoo.ctx.batch_mask(x), granularity).reshape(-1, v.numel()) @ v)

    token = zoo.ctx.steer(gates={site: gate(v) for site, v in gates.items()})
    try:
        yield
    finally:
        zoo.ctx.restore(token)


def _fit_gates(zoo: Zoo, name: str, examples: list[Example], settings: dict[str, Any]) -> None:
    """PHATGOOSE: gate vectors [d] of every site trained together by the LM loop (AdamW, warm-up, clipping)."""
    pairs = [(r, layer) for r, layer in router_sites(zoo) if name in r.expert_names]  # where the expert sits
    opts = pairs[0][0].options
    gates = {layer.site.name: torch.zeros(layer.site.d_in, device=zoo.device, requires_grad=True) for _, layer in pairs}
    with zoo.force_expert(name), gates_applied(zoo, gates):
        train_params(zoo, list(gates.values()), examples, steps=opts.steps, lr=opts.lr, batch_size=opts.batch_size,
                     seed=pairs[0][0].expert_seed(name), desc=f"gates {name}", progress=settings["progress"])
    router: FitsFromGates
    for router, layer in pairs:
        router.set_gate(name, gates[layer.site.name])


FITTERS: dict[str, Callable[[Zoo, str, Any, dict[str, Any]], None]] = {
    "activations": _fit_activations, "weights": _fit_weights, "gates": _fit_gates}  # keys: CAPABILITIES' keys


# ---------------------------------------------------------------- the entry points

def fit_router(zoo: Zoo, data: dict[str, list[Example]] | None = None, *, experts: list[str] | None = None,
               collect: str = "expert", max_tokens: int = 20_000, batch_size: int = 8,
               progress: bool = False) -> dict[str, float]:
    """Fit the zoo's router for `experts` (default: those named in `data`; for arrow, which needs no data, every
    expert), each from its own data only; the other experts' fitted state is kept. Returns seconds per expert.

    `collect`: router inputs are gathered with the expert itself running at every site ("expert") or with the
    base alone ("base"); either way they depend on that expert and its data only.
    """
    data = data or {}
    router = router_sites(zoo)[0][0] if zoo.layers else None
    kind = zoo.zoo_config.router.kind
    if router is None or router.fit_from is None:
        fitted = ", ".join(k for k in ROUTERS.names() if ROUTERS.get(k).fit_from)
        raise ZooError(f"router kind {kind!r} is not built from data; fit one of: {fitted} (or train it)")
    capability = CAPABILITIES[router.fit_from]
    if not isinstance(router, capability):
        raise ZooError(f"router kind {kind!r} says fit_from={router.fit_from!r} but is no {capability.__name__}; "
                       f"give the kind the methods of routers/base.py's {capability.__name__}")
    names = experts if experts is not None else list(data) or (zoo.expert_names if router.fit_from == "weights" else [])
    if not names:
        raise ZooError(f"no expert to fit: give each expert's data as EXPERT=PATH (router kind {kind!r})")
    zoo._check_names(names)
    missing = [n for n in names if router.fit_from != "weights" and n not in data]
    if missing:
        raise ZooError(f"expert {missing[0]!r} has no data; router kind {kind!r} fits each expert from its own "
                       f"data: give {missing[0]}=PATH")
    if collect not in ("expert", "base"):
        raise ZooError(f"collect {collect!r} is unknown; use 'expert' (the expert runs) or 'base' (the base alone)")
    settings = {"collect": collect, "max_tokens": max_tokens, "batch_size": batch_size, "progress": progress}
    seconds = {}
    for name in names:
        start = time.perf_counter()
        FITTERS[router.fit_from](zoo, name, data.get(name), settings)
        seconds[name] = time.perf_counter() - start
    return seconds


def unfitted_experts(zoo: Zoo) -> list[str]:
    """Experts that some (fitted) router of the zoo, at a site where they sit, has not been fitted for yet."""
    out: set[str] = set()
    for router in zoo.routers():
        flags = getattr(router, "fitted", None)
        out |= set() if flags is None else {n for n, f in zip(router.expert_names, flags.tolist()) if not f}
    return [n for n in zoo.expert_names if n in out]


def with_router(zoo: Zoo, router: dict[str, Any]) -> Zoo:
    """A new zoo with the same base, sites and experts (weights copied) and a fresh router built from `router`.

    The base is loaded again from the config's `base` spec (then moved to `zoo`'s device); `zoo` is left as it was.
    """
    config = zoo.zoo_config.replace(router=router)
    new = build(config, load_sources=False).to(zoo.device)
    for old_layer, new_layer in zip(zoo.layers, new.layers):
        new_layer.experts.load_state_dict(old_layer.experts.state_dict())
    new.train(zoo.training)
    return new
