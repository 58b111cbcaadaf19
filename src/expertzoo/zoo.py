"""Zoo: a transformers causal LM with ZooLayers swapped in at its sites; add, remove, steer, trace, save.
Its constructor only builds modules from a config (no file or network access): `expertzoo.build` loads sources."""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn

from .config import ExpertSpec, ZooConfig, load_config
from .errors import ZooError
from .experts import EXPERTS
from .io.expert_folder import write_expert_folder
from .io.sources import folder_options, resolve_spec
from .io.zoo_folder import FORMAT_VERSION, write_zoo_folder
from .nn.compat import compiled_generation, past_length
from .nn.context import RoutingContext, Trace
from .nn.layer import ZooLayer
from .nn.sites import Site, find_sites, placed_sites
from .routers import ROUTERS, Router


class Zoo(nn.Module):
    """Behaves as the wrapped causal LM (`zoo(input_ids=...)`, `zoo.generate(...)`) and manages its experts."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: ZooConfig):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.zoo_config = config
        self.ctx = RoutingContext()  # the routing state of each call (thread, task): steering, running means, aux
        self.base_params: list[str] = []  # base parameters the zoo changed (averaged, trained): saved with it
        self.provenance: dict[str, dict[str, Any]] = {}  # expert -> where its weights came from (saved in zoo.json)
        self.sites, where = self.layout(config)
        for p in model.parameters():
            p.requires_grad_(False)
        with _seeded(config.seed):
            self.global_router = self._new_router(self.sites[0].d_in, self.expert_names) \
                if config.router.scope == "global" and self.sites else None
            self.ctx.global_router = self.global_router
            for site in self.sites:
                self._wrap(site, {s.name: self._new_expert(s, site) for s in config.experts if site.name in where[s.name]})
        self._map_experts()
        model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self.train(model.training)  # new routers and experts follow the base (eval after load_base)

    # ------------------------------------------------------------------ the causal LM face
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, compile: bool = False, **kwargs):
        """transformers' `generate` on the wrapped model. `compile=True`: a static KV cache and the decode steps
        through `torch.compile(fullgraph=True)` (the zoo's forward has no graph break for token-choice routers);
        greedy output equals eager. The first call compiles (seconds to minutes), later calls reuse it."""
        if compile:
            if any(router.host_sync for router in self.routers()):
                raise ZooError(f"the {self.zoo_config.router.kind} router reads its choices on the host, so it "
                               "cannot be compiled; generate without compile, or choose a token-choice router")
            capturable = all(e.graph_capturable() for layer in self.layers for e in layer.experts.values())
            for key, value in compiled_generation(self.device, cuda_graphs=capturable).items():
                kwargs.setdefault(key, value)
        return self.model.generate(*args, **kwargs)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _begin_forward(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seq = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        carries = self.zoo_config.router.granularity == "sequence"  # only running sequence means outlive a call
        self.ctx.begin(kwargs.get("attention_mask"), past_length(kwargs, seq) if carries else None, seq)

    # ------------------------------------------------------------------ building blocks
    def layout(self, config: ZooConfig) -> tuple[list[Site], dict[str, set[str]]]:
        """The zoo's sites (the union of its experts' placements, in module order; with no expert, the zoo's own
        `sites` x `layers`) and the site names of each expert."""
        n_layers = self.model.config.num_hidden_layers
        placements = {s.name: config.placement(s, n_layers) for s in config.experts}
        if not placements:
            return find_sites(self.model, config.sites, config.layer_indices(n_layers)), {}
        sites, where = placed_sites(self.model, placements)
        for spec in config.experts:
            if spec.at is not None:
                outside = sorted(set(spec.at) - where[spec.name])
                if outside:
                    raise ZooError(f"expert {spec.name!r}: `at` names {outside[0]}, which is not among its sites and "
                                   "layers; list only sites it sits at")
                where[spec.name] = set(spec.at)
        used = set().union(*where.values())
        return [s for s in sites if s.name in used], where

    def _wrap(self, site: Site, experts: dict[str, nn.Module]) -> ZooLayer:
        """Swap a ZooLayer in at `site` with these experts (in the zoo's order) and a router over them."""
        dtype = next(self.model.parameters()).dtype
        router = None if self.zoo_config.router.scope == "global" or self._block_led(site, list(experts)) \
            else self._new_router(site.d_in, list(experts))
        layer = ZooLayer(base_layer=site.module, site=site, experts=nn.ModuleDict(experts).to(dtype), router=router,
                         ctx=self.ctx, granularity=self.zoo_config.router.granularity)
        parent, _, child = site.name.rpartition(".")
        setattr(self.model.get_submodule(parent), child, layer)
        return layer

    def _block_led(self, site: Site, names: list[str]) -> bool:
        """An earlier site of `site`'s block (attention projections) already holds the block's router over the same
        experts: `site` shares its decision instead of routing again."""
        return site.block is not None and any(
            l.site.block == site.block and l.router is not None and list(l.experts) == names for l in self.layers)

    def _unwrap(self, layer: ZooLayer) -> None:
        """Put the site's original module back (the site has no expert left)."""
        parent, _, child = layer.site.name.rpartition(".")
        setattr(self.model.get_submodule(parent), child, layer.base_layer)

    def _map_experts(self) -> None:
        for layer in self.layers:
            layer.map_experts(self.expert_names)

    def _new_router(self, d_in: int, experts: list[str]) -> Router:
        spec = self.zoo_config.router
        return ROUTERS.get(spec.kind)(d_in=d_in, experts=experts, top_k=spec.top_k, null_experts=spec.null_experts,
                                      always_on_base=spec.always_on_base, options=spec.options)

    def _new_expert(self, spec: ExpertSpec, site: Site) -> nn.Module:
        """A new expert in the base's floating dtype and on its device (a bfloat16 base: bfloat16 experts)."""
        expert = EXPERTS.get(spec.kind)(site=site, options=spec.options)
        ref = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return expert if ref is None else expert.to(device=ref.device, dtype=ref.dtype)

    @property
    def layers(self) -> list[ZooLayer]:
        return [m for m in self.model.modules() if isinstance(m, ZooLayer)]

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.zoo_config.experts]

    def routers(self) -> list[Router]:
        if self.global_router is not None:
            return [self.global_router]
        return [l.router for l in self.layers if l.router is not None]  # a block's later sites share its router

    def layers_of(self, name: str) -> list[ZooLayer]:
        """The layers where expert `name` sits (its placement), in module order."""
        self._check_names([name])
        return [l for l in self.layers if name in l.experts]

    def placement(self) -> dict[str, list[str]]:
        """Every expert's site names: {expert: [site, ...]} (the zoo's layout, as `zoo info` shows it)."""
        return {n: [l.site.name for l in self.layers_of(n)] for n in self.expert_names}

    @property
    def rectangular(self) -> bool:
        """Every expert sits at every site of the zoo."""
        return all(list(l.experts) == self.expert_names for l in self.layers)

    def expert_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of one expert (or of all experts) at every site where it sits."""
        self._check_names([name] if name else [])
        return [p for l in self.layers for n, e in l.experts.items() if name in (None, n) for p in e.parameters()]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.routers() for p in r.parameters()]

    def aux_losses(self) -> dict[str, torch.Tensor]:
        """Router losses of the last forward, averaged over sites ({} when no router made any)."""
        keys = {k for aux in self.ctx.aux for k in aux}
        return {k: torch.stack([a[k] for a in self.ctx.aux if k in a]).mean() for k in sorted(keys)}

    # ------------------------------------------------------------------ managing experts
    def _check_names(self, names: list[str]) -> None:
        for n in names:
            if n not in self.expert_names:
                raise ZooError(f"no expert named {n!r}; this zoo has: {', '.join(self.expert_names) or 'no experts'}")

    def add_expert(self, spec: dict[str, Any] | ExpertSpec) -> None:
        """Add an expert at its sites (its own `sites` / `layers`, an expert folder's, else the zoo's); sites new to
        the zoo get a layer and a fresh router. A fresh residual expert changes nothing until trained."""
        spec = load_config({"experts": [spec]}).experts[0]  # alone: a fixed router does not list it yet
        spec = folder_options(spec)
        if spec.name in self.expert_names:
            raise ZooError(f"expert {spec.name!r} already exists; pick another name or remove_expert it first")
        config = self.zoo_config.model_copy(update={"experts": [*self.zoo_config.experts, spec]})
        sites, where = self.layout(config)
        own = [s for s in sites if s.name in where[spec.name]]
        spec = resolve_spec(spec, self.model, own[0])
        dtype = next(self.model.parameters()).dtype
        made = {s.name: self._sourced_expert(spec, s).to(dtype=dtype, device=self.device).train(self.training)
                for s in own}  # all built before any is attached: a bad source changes nothing
        self.zoo_config = config.model_copy(update={"experts": [*self.zoo_config.experts, spec]})
        self.sites = sites
        layers = {l.site.name: l for l in self.layers}
        with _seeded(config.seed):
            for site in sites:
                if site.name in layers and site.name in made:
                    layers[site.name].experts[spec.name] = made[site.name]
                    if layers[site.name].router is not None:
                        layers[site.name].router.add_expert(spec.name)
                elif site.name not in layers:
                    self._wrap(site, {spec.name: made[site.name]} if site.name in made else {}) \
                        .to(self.device).train(self.training)
        if self.global_router is not None:
            self.global_router.add_expert(spec.name)
        self._map_experts()
        if spec.source is not None:
            self.provenance[spec.name] = provenance(spec, self.layers_of(spec.name))

    def _sourced_expert(self, spec: ExpertSpec, site: Site) -> nn.Module:
        expert = self._new_expert(spec, site)
        if spec.source is not None:
            expert.load_source(spec.source, site)
        return expert

    def save_expert(self, name: str, directory: str | Path) -> Path:
        """Write one expert as a folder that a config takes as `{name, kind, from: DIR}`."""
        self._check_names([name])
        spec = next(e for e in self.zoo_config.experts if e.name == name)
        layers = self.layers_of(name)
        tensors = {f"{l.site.name}.{k}": t for l in layers for k, t in l.experts[name].state_dict().items()}
        meta = {"name": name, "kind": spec.kind, "options": spec.options.model_dump(), "base": self.zoo_config.base,
                "sites": [l.site.name for l in layers], "format_version": FORMAT_VERSION}
        path = write_expert_folder(directory, meta, tensors)
        save_extra = getattr(EXPERTS.get(spec.kind), "save_extra", None)  # e.g. lora: a PEFT adapter in peft/
        if save_extra is not None:
            save_extra(path, options=spec.options, sites=[l.site for l in layers],
                       experts=[l.experts[name] for l in layers], base=self.zoo_config.base)
        return path

    def remove_expert(self, name: str) -> None:
        """Remove an expert from every site where it sits; a site left without experts gets its module back."""
        self._check_names([name])
        self._drop(name, self.layers_of(name))
        if self.global_router is not None:
            self.global_router.remove_expert(name)
        if name in self.ctx.disabled:
            self.ctx.steer(disabled=self.ctx.disabled - {name})
        kept = [e for e in self.zoo_config.experts if e.name != name]
        self.zoo_config = self.zoo_config.model_copy(update={"experts": kept})
        listed = getattr(self.zoo_config.router.options, "experts", None)
        if listed is not None and name in listed:  # a fixed router lists experts: keep the list valid for saving
            router = {**self.zoo_config.router.to_dict(), "experts": [n for n in listed if n != name]}
            self.zoo_config = self.zoo_config.replace(router=router)
        self.provenance.pop(name, None)
        self._relayout()

    def _drop(self, name: str, layers: list[ZooLayer]) -> None:
        """Take expert `name` out of these layers and their routers."""
        for layer in layers:
            del layer.experts[name]
            if layer.router is not None:
                layer.router.remove_expert(name)

    def _relayout(self) -> None:
        """After experts left: sites no expert sits at get their module back; with no expert left the zoo keeps its
        own sites, without experts. Then every layer's index maps follow the zoo's experts."""
        self.sites, _ = self.layout(self.zoo_config)
        wanted, layers = {s.name for s in self.sites}, {l.site.name: l for l in self.layers}
        for layer in layers.values():
            if layer.site.name not in wanted:
                self._unwrap(layer)
        with _seeded(self.zoo_config.seed):
            for site in self.sites:
                if site.name not in layers:
                    self._wrap(site, {}).to(self.device).train(self.training)
        self._map_experts()

    def remove_expert_at(self, name: str, sites: list[str]) -> None:
        """Remove expert `name` from these sites only (per-site pruning); it keeps the others (recorded as its
        spec's `at`). Removing it from every site where it sits removes it."""
        here = [l.site.name for l in self.layers_of(name)]
        unknown = [s for s in sites if s not in here]
        if unknown:
            raise ZooError(f"expert {name!r} does not sit at {unknown[0]}; it sits at: {', '.join(here)}")
        left = [s for s in here if s not in sites]
        if not left:
            return self.remove_expert(name)
        self._drop(name, [l for l in self.layers_of(name) if l.site.name in sites])
        specs = [e.model_copy(update={"at": left}) if e.name == name else e for e in self.zoo_config.experts]
        self.zoo_config = self.zoo_config.model_copy(update={"experts": specs})
        self._relayout()

    def disable_expert(self, name: str) -> None:
        """Never route to `name` in this thread or task (other callers keep their own steering)."""
        self._check_names([name])
        self.ctx.steer(disabled=self.ctx.disabled | {name})

    def enable_expert(self, name: str) -> None:
        self._check_names([name])
        self.ctx.steer(disabled=self.ctx.disabled - {name})

    @contextlib.contextmanager
    def _restoring(self, token):
        try:
            yield self
        finally:
            self.ctx.restore(token)

    def force_expert(self, names: str | list[str] | None):
        """Route every token to these experts (equal weight; [] = base alone; None = the router again), in this
        thread or task only. Takes effect at once; used as `with zoo.force_expert("code"):` it is undone on exit
        (nested blocks restore the outer one's experts)."""
        names = [names] if isinstance(names, str) else names
        self._check_names(names or [])
        return self._restoring(self.ctx.steer(forced=None if names is None else tuple(names)))

    @contextlib.contextmanager
    def trace(self) -> Iterator[Trace]:
        """Record per-site routing decisions of every forward inside the block (this thread's or task's)."""
        trace = Trace()
        token = self.ctx.steer(trace=trace)
        try:
            yield trace
        finally:
            self.ctx.restore(token)

    # ------------------------------------------------------------------ save / load
    def zoo_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what the zoo adds: experts and routers, keyed by site."""
        out = {}
        for layer in self.layers:
            for key, t in layer.state_dict().items():
                if not key.startswith("base_layer."):
                    out[f"{layer.site.name}.{key}"] = t
        if self.global_router is not None:
            out.update({f"global_router.{k}": t for k, t in self.global_router.state_dict().items()})
        if self.base_params:
            params = dict(self.model.named_parameters())
            out.update({f"base.{n}": params[n].data for n in self.base_params})
        return out

    def mark_base_params(self, names: list[str]) -> None:
        """Save these base parameters (by name in `self.model`) with the zoo: they were averaged or trained."""
        own = dict(self.model.named_parameters())
        unknown = [n for n in names if n not in own]
        if unknown:
            raise ZooError(f"the base has no parameter {unknown[0]!r}; name parameters as model.named_parameters() does")
        self.base_params = sorted(set(self.base_params) | set(names))

    def load_zoo_state_dict(self, state: dict[str, torch.Tensor], source: str = "weights") -> None:
        own = self.zoo_state_dict()
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            what = f"lacks {missing[0]!r}" if missing else f"has unexpected {extra[0]!r}"
            raise ZooError(f"{source} {what}; it was saved from a different zoo config")
        for key, t in own.items():
            if state[key].shape != t.shape:
                raise ZooError(f"{source}: {key!r} has shape {tuple(state[key].shape)}, the zoo expects {tuple(t.shape)}")
            if not torch.isfinite(state[key]).all():
                raise ZooError(f"{source}: {key!r} holds NaN or Inf values; retrain or re-save that expert")
            with torch.no_grad():
                t.copy_(state[key])
        for router in self.routers():
            router.state_loaded()

    def saved_config(self) -> dict[str, Any]:
        """The config as a saved zoo keeps it: no `from:` (the weights travel with the zoo; see `provenance`)."""
        config = self.zoo_config.to_dict()
        config["experts"] = [{k: v for k, v in e.items() if k != "from"} for e in config["experts"]]
        return config

    def save(self, directory: str | Path) -> Path:
        """Write zoo.json + experts.safetensors atomically (a half-written zoo is never left behind).

        The weights are all in experts.safetensors, so the config keeps no `from:`: where each sourced expert came
        from is recorded as `provenance` (name, kind, source path, sha256 of the weights taken from it)."""
        meta: dict[str, Any] = {"config": self.saved_config()}
        if self.base_params:
            meta["base_params"] = self.base_params
        if self.provenance:
            meta["provenance"] = {n: p for n, p in self.provenance.items() if n in self.expert_names}
        return write_zoo_folder(directory, meta, self.zoo_state_dict())


def provenance(spec: ExpertSpec, layers: list[ZooLayer]) -> dict[str, Any]:
    """Where an expert's weights came from: {name, kind, source, sha256} (sha256 of its tensors as taken from the
    source, every site's, in name order: the same weights give the same hash)."""
    digest = hashlib.sha256()
    for layer in layers:
        for key, t in sorted(layer.experts[spec.name].state_dict().items()):
            digest.update(f"{layer.site.name}.{key}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {"name": spec.name, "kind": spec.kind, "source": str(spec.source), "sha256": digest.hexdigest()}


def router_sites(zoo: Zoo) -> list[tuple[Router, ZooLayer]]:
    """Every router with the layer whose input feeds it (a global router: the first site; a block's router: the
    block's first site)."""
    if zoo.global_router is not None:
        return [(zoo.global_router, zoo.layers[0])]
    return [(layer.router, layer) for layer in zoo.layers if layer.router is not None]


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)
