"""ZooLayer: wraps a site's base module; forward = route -> dispatch -> combine."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ZooError
from .context import RoutingContext
from .dispatch import Plan, mix, mix_reference
from .routing import BASE, NULL, RouteInput, Routing, base_alone, fixed_routing, gated_routing
from .sites import Site


class ZooLayer(nn.Module):
    """y(x) = sum over S(x) of g_i(x) E_i(x) at one site; E_0 = `base_layer`, the original module.

    `router` is None when the zoo routes globally, or when the site shares its block's router (`site.block`): the
    decision then comes from the current call (nn/context.py).
    `experts` are the zoo's experts placed at this site, in the zoo's order; the router routes over them alone.
    `map_experts(zoo_names)` builds, once, the device maps between the site's expert indices and the zoo's: a
    global decision (over every expert of the zoo) is read through them, and traces record the zoo's indices.
    """

    def __init__(self, *, base_layer: nn.Module, site: Site, experts: nn.ModuleDict,
                 router: nn.Module | None, ctx: RoutingContext, granularity: str):
        super().__init__()
        self.base_layer = base_layer
        self.experts = experts
        self.router = router
        self.site = site
        self.ctx = ctx
        self.granularity = granularity
        self.map_experts(list(experts))

    def map_experts(self, zoo_names: list[str]) -> None:
        """Index maps between the zoo's experts `zoo_names` and this site's, as non-persistent device buffers:
        `from_zoo` [E_zoo+2] (zoo index + 2 -> site index; an expert absent here -> NULL; BASE, NULL kept) and
        `to_zoo` [E_site+2] (site index + 2 -> zoo index). Called by the zoo whenever its experts change."""
        here = list(self.experts)
        missing = [n for n in here if n not in zoo_names]
        if missing:
            raise ValueError(f"site {self.site.name} holds expert {missing[0]!r}, which the zoo does not list")
        device = next((t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))
        from_zoo = [BASE, NULL] + [here.index(n) if n in here else NULL for n in zoo_names]
        to_zoo = [BASE, NULL] + [zoo_names.index(n) for n in here]
        self.register_buffer("from_zoo", torch.tensor(from_zoo, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("to_zoo", torch.tensor(to_zoo, dtype=torch.long, device=device), persistent=False)
        self.whole_zoo = here == list(zoo_names)  # the maps are the identity: skipped
        self._plans = {"plan": Plan(list(self.experts.values()))}  # made here, eagerly: a compiled call only reads it

    def localise(self, routing: Routing) -> Routing:
        """A decision over the zoo's experts [T,k] as this site's: experts absent here become NULL slots and the
        slots left are rescaled to the token's whole weight (renormalised, as for AdaMoE null slots); a token left
        with no slot keeps base(x) at a residual site. Device ops only (no host sync)."""
        if self.whole_zoo:
            return routing
        idx = self.from_zoo[routing.indices + 2]  # [T,k]
        kept = routing.weights * (idx != NULL)  # [T,k]
        w = kept * (routing.weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp(min=1e-12))
        return Routing(weights=w, indices=idx, logits=routing.logits, merge=routing.merge)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x: [..., d_in]
        h = x.reshape(-1, x.shape[-1])  # [T, d_in]
        routing = self.route(x)
        out = self.dispatch(h, routing, *args, **kwargs)  # [T, d_out]
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def route(self, x: torch.Tensor) -> Routing:
        """Routing for every token of x [..., d_in], recorded in the trace whichever way it was decided."""
        routing = self.decide(x)
        trace = self.ctx.trace
        if trace is not None:  # indices in the zoo's numbering (zoo.expert_names); `experts`: those at this site
            indices = routing.indices if self.whole_zoo else self.to_zoo[routing.indices + 2]
            trace.records.append({"site": self.site.name, "step": self.ctx.step, "indices": indices.detach().cpu(),
                                  "weights": routing.weights.detach().cpu(), "shape": tuple(x.shape[:-1]),
                                  "experts": list(self.experts)})
        return routing

    def decide(self, x: torch.Tensor) -> Routing:
        """Forced experts, else the global decision shared by all sites, else this site's router; a site that
        shares its block's router (`site.block`, no router of its own) takes the decision the block's first site
        made in this call. The steering and the decisions are the current call's (`RoutingContext`)."""
        block = self.site.block
        if block is not None and self.router is None and self.ctx.global_router is None:
            return self._block_decision(block, x)
        routing = self._decide(x)
        if block is not None:
            self.ctx.call.block_routing[block] = routing
        return routing

    def _block_decision(self, block: str, x: torch.Tensor) -> Routing:
        routing = self.ctx.call.block_routing.get(block)
        n_tokens = x.numel() // x.shape[-1]
        if routing is None or routing.indices.shape[0] != n_tokens:
            raise ZooError(f"site {self.site.name} shares the router of {block}, but {block}'s first site has not "
                           f"routed these {n_tokens} tokens in this call; run the whole model, not this layer alone")
        return routing

    def _decide(self, x: torch.Tensor) -> Routing:
        steering, call = self.ctx.steering, self.ctx.call
        n_tokens = x.numel() // x.shape[-1]
        if steering.forced is not None:
            names = list(self.experts)
            routing = fixed_routing(n_tokens, [names.index(n) for n in steering.forced if n in names], x.device)
            gate = (steering.gates or {}).get(self.site.name)  # PHATGOOSE gate training scales the forced expert
            return routing if gate is None else gated_routing(routing, gate(x))
        if self.router is None and call.global_routing is not None:
            return self.localise(call.global_routing)
        router = self.router or self.ctx.global_router  # a Router (routers/base.py)
        allowed = self._allowed(router.expert_names, steering.disabled, x.device)
        h = x if self.granularity == "token" else self.ctx.running_mean(self.site.name, x.reshape(-1, *x.shape[-2:]))
        routing = router(RouteInput(h=h.reshape(n_tokens, -1).float(), allowed=allowed, seq_mask=self.ctx.batch_mask(x),
                                    every_allowed=not steering.disabled))
        if steering.disabled and not router.null_experts:  # no expert left to choose: the base alone (on the device)
            routing = base_alone(routing, (~allowed.any()).expand(n_tokens))
        if routing.aux:
            call.aux.append(routing.aux)
        if self.router is None:
            call.global_routing = routing
            return self.localise(routing)
        return routing

    def _allowed(self, names: list[str], disabled, device: torch.device) -> torch.Tensor:
        """[E] bool, the router's experts not disabled; the all-allowed mask is made once per expert count and
        device (a decode step would otherwise build it at every site)."""
        if disabled:
            return torch.tensor([n not in disabled for n in names], dtype=torch.bool, device=device)
        if torch.compiler.is_compiling():  # a constant of the graph
            return torch.ones(len(names), dtype=torch.bool, device=device)
        cached = self.__dict__.get("_every_allowed")
        if cached is None or cached.numel() != len(names) or cached.device != device:
            cached = self.__dict__["_every_allowed"] = torch.ones(len(names), dtype=torch.bool, device=device)
        return cached

    reference_dispatch = False  # True: the plain dispatch path, which tests and bench/ compare the fast one with

    def dispatch(self, h: torch.Tensor, routing: Routing, *args, **kwargs) -> torch.Tensor:
        """Mix base(h) and the routed experts for tokens h [T, d_in] -> [T, d_out] (dispatch.py)."""
        base = lambda: self.base_layer(h, *args, **kwargs)  # noqa: E731  (called only when some token needs it)
        if self.reference_dispatch:
            return mix_reference(h, routing, self.experts, base, self.site.d_out)
        return mix(h, routing, self.experts, base, self.site.d_out, plans=self._plans)
