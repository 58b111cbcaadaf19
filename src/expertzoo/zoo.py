"""Zoo: a transformers causal LM with ZooLayers swapped in at its sites; build, load, save, steer, trace."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, recover
from .base_models import load_base
from .build import finish_build, prepare_config, resolve_spec
from .compat import past_length
from .config import ExpertSpec, ZooConfig, load_config, one_line, parse_config
from .context import RoutingContext, Trace
from .errors import ZooError
from .experts import EXPERTS
from .experts.folder import is_expert_folder, read_expert_meta, write_expert_folder
from .layer import ZooLayer
from .routers import ROUTERS, Router
from .sites import Site, find_sites

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "zoo.json", "experts.safetensors"


class Zoo(nn.Module):
    """Behaves as the wrapped causal LM (`zoo(input_ids=...)`, `zoo.generate(...)`) and manages its experts."""

    def __init__(self, model: nn.Module, tokenizer: Any, config: ZooConfig, *, load_sources: bool = True):
        super().__init__()
        config = _with_folder_options(config) if load_sources else config  # `from: DIR` takes the folder's options
        config = prepare_config(config, model) if load_sources else config  # sources checked, PEFT ranks taken
        self.model = model
        self.tokenizer = tokenizer
        self.zoo_config = config
        self.ctx = RoutingContext()
        self.base_params: list[str] = []  # base parameters the zoo changed (averaged, trained): saved with it
        layers = config.layer_indices(model.config.num_hidden_layers)
        self.sites: list[Site] = find_sites(model, config.sites, layers)
        for p in model.parameters():
            p.requires_grad_(False)
        dtype = next(model.parameters()).dtype
        with _seeded(config.seed):
            self.global_router = self._new_router(self.sites[0].d_in) if config.router.scope == "global" else None
            self.ctx.global_router = self.global_router
            for site in self.sites:
                experts = nn.ModuleDict({s.name: self._new_expert(s, site, load_sources) for s in config.experts})
                router = None if self.global_router is not None else self._new_router(site.d_in)
                layer = ZooLayer(base_layer=site.module, site=site, experts=experts.to(dtype), router=router,
                                 ctx=self.ctx, granularity=config.router.granularity)
                parent, _, child = site.name.rpartition(".")
                setattr(model.get_submodule(parent), child, layer)
        model.register_forward_pre_hook(self._begin_forward, with_kwargs=True)
        self.train(model.training)  # new routers and experts follow the base (eval after load_base)
        if load_sources:
            finish_build(self)  # non_expert_params: average; router init from prompts

    # ------------------------------------------------------------------ the causal LM face
    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
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
        self.ctx.begin(kwargs.get("attention_mask"), past_length(kwargs, seq), seq)

    # ------------------------------------------------------------------ building blocks
    def _new_router(self, d_in: int) -> Router:
        spec = self.zoo_config.router
        return ROUTERS.get(spec.kind)(d_in=d_in, experts=[e.name for e in self.zoo_config.experts], top_k=spec.top_k,
                                      null_experts=spec.null_experts, always_on_base=spec.always_on_base,
                                      options=spec.options)

    def _new_expert(self, spec: ExpertSpec, site: Site, load_source: bool) -> nn.Module:
        expert = EXPERTS.get(spec.kind)(site=site, options=spec.options)
        if spec.source is not None and load_source:
            expert.load_source(spec.source, site)
        return expert

    @property
    def layers(self) -> list[ZooLayer]:
        return [m for m in self.model.modules() if isinstance(m, ZooLayer)]

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.zoo_config.experts]

    def routers(self) -> list[Router]:
        return [self.global_router] if self.global_router is not None else [l.router for l in self.layers]

    def expert_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """Parameters of one expert (or of all experts) at every site."""
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
        """Add an expert at every site (a fresh residual expert changes nothing until trained)."""
        spec = load_config({"experts": [spec]}).experts[0]  # alone: a fixed router does not list it yet
        spec = _folder_options(spec)
        spec = resolve_spec(spec, self.model, self.layers[0].site if self.layers else None)
        if spec.name in self.expert_names:
            raise ZooError(f"expert {spec.name!r} already exists; pick another name or remove_expert it first")
        dtype = next(self.model.parameters()).dtype
        made = [self._new_expert(spec, layer.site, True).to(dtype=dtype, device=self.device).train(self.training)
                for layer in self.layers]  # all built before any is attached: a bad checkpoint changes nothing
        for layer, expert in zip(self.layers, made):
            layer.experts[spec.name] = expert
        for router in self.routers():
            router.add_expert(spec.name)
        self.zoo_config = self.zoo_config.model_copy(update={"experts": [*self.zoo_config.experts, spec]})

    def save_expert(self, name: str, directory: str | Path) -> Path:
        """Write one expert as a folder that a config takes as `{name, kind, from: DIR}`."""
        self._check_names([name])
        spec = next(e for e in self.zoo_config.experts if e.name == name)
        tensors = {f"{l.site.name}.{k}": t for l in self.layers for k, t in l.experts[name].state_dict().items()}
        meta = {"name": name, "kind": spec.kind, "options": spec.options, "base": self.zoo_config.base,
                "sites": [l.site.name for l in self.layers], "format_version": FORMAT_VERSION}
        path = write_expert_folder(directory, meta, tensors)
        save_extra = getattr(EXPERTS.get(spec.kind), "save_extra", None)  # e.g. lora: a PEFT adapter in peft/
        if save_extra is not None:
            save_extra(path, options=spec.options, sites=[l.site for l in self.layers],
                       experts=[l.experts[name] for l in self.layers], base=self.zoo_config.base)
        return path

    def remove_expert(self, name: str) -> None:
        self._check_names([name])
        for layer in self.layers:
            del layer.experts[name]
        for router in self.routers():
            router.remove_expert(name)
        self.ctx.disabled.discard(name)
        kept = [e for e in self.zoo_config.experts if e.name != name]
        self.zoo_config = self.zoo_config.model_copy(update={"experts": kept})

    def disable_expert(self, name: str) -> None:
        self._check_names([name])
        self.ctx.disabled.add(name)

    def enable_expert(self, name: str) -> None:
        self._check_names([name])
        self.ctx.disabled.discard(name)

    @contextlib.contextmanager
    def _restoring_force(self, previous):
        try:
            yield self
        finally:
            self.ctx.forced = previous

    def force_expert(self, names: str | list[str] | None):
        """Route every token to these experts (equal weight; [] = base alone; None = the router again).
        Takes effect at once; used as `with zoo.force_expert("code"):` it is undone on exit."""
        names = [names] if isinstance(names, str) else names
        self._check_names(names or [])
        previous, self.ctx.forced = self.ctx.forced, names
        return self._restoring_force(previous)

    @contextlib.contextmanager
    def trace(self) -> Iterator[Trace]:
        """Record per-site routing decisions of every forward inside the block."""
        self.ctx.trace = trace = Trace()
        try:
            yield trace
        finally:
            self.ctx.trace = None

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

    def save(self, directory: str | Path) -> Path:
        """Write zoo.json + experts.safetensors atomically (a half-written zoo is never left behind)."""
        directory = Path(directory)
        _check_output(directory)
        with atomic_dir(directory) as tmp:
            meta = {"format_version": FORMAT_VERSION, "config": self.zoo_config.to_dict()}
            if self.base_params:
                meta["base_params"] = self.base_params
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            tensors = {k: v.detach().cpu().contiguous() for k, v in self.zoo_state_dict().items()}
            save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "expertzoo": str(FORMAT_VERSION)})
        return directory


def _check_output(directory: Path) -> None:
    """An existing zoo folder may be replaced, an empty folder filled; anything else is refused."""
    if directory.exists() and not (directory / CONFIG_FILE).is_file():
        if not directory.is_dir() or any(directory.iterdir()):
            raise ZooError(f"{str(directory)!r} exists and is not a zoo folder; choose an empty or new output folder")


def _folder_options(spec: ExpertSpec) -> ExpertSpec:
    """Options an expert folder recorded (`zoo train-expert`, save_expert) fill in those a `from: DIR` spec left
    at the kind's defaults; options the config sets to other values win (e.g. fewer DiT sampling steps)."""
    if spec.source is None or not is_expert_folder(spec.source):
        return spec
    meta = read_expert_meta(spec.source)
    if meta["kind"] != spec.kind:
        return spec  # loading it reports the kind mismatch
    defaults = {k: f.default for k, f in EXPERTS.get(spec.kind).Options.model_fields.items()}
    saved = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    merged = {k: saved[k] if k in saved and v == defaults.get(k) else v for k, v in spec.options.items()}
    if merged == spec.options:
        return spec
    try:
        return ExpertSpec(**{**spec.to_dict(), **merged})
    except ValidationError as err:
        raise ZooError(f"expert folder {spec.source!r} records bad options ({one_line(err)}); re-save the expert") from None


def _with_folder_options(config: ZooConfig) -> ZooConfig:
    specs = [_folder_options(s) for s in config.experts]
    return config if specs == list(config.experts) else config.model_copy(update={"experts": specs})


@contextlib.contextmanager
def _seeded(seed: int):
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def build(config: dict | str | Path | ZooConfig, *, model: nn.Module | None = None, tokenizer: Any = None,
          load_sources: bool = True) -> Zoo:
    """Build a zoo from a config (dict, YAML path or ZooConfig). Pass `model`/`tokenizer` to reuse a loaded base."""
    config = load_config(config)
    if model is None:
        model, tokenizer = load_base(config.base)
    return Zoo(model, tokenizer, config, load_sources=load_sources)


def load(directory: str | Path, *, model: nn.Module | None = None, tokenizer: Any = None) -> Zoo:
    """Load a zoo saved by `Zoo.save`: the base from its spec, then the zoo's own weights."""
    directory = Path(directory)
    recover(directory)
    cfg_path, w_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file():
        raise ZooError(f"{str(directory)!r} is not a zoo folder (no {CONFIG_FILE}); build one with `zoo build`")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ZooError(f"{str(cfg_path)!r} is not valid JSON; the zoo folder is damaged, rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ZooError(f"{str(cfg_path)!r} has format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}, "
                       f"this expertzoo reads {FORMAT_VERSION}; rebuild the zoo")
    try:
        config = parse_config(meta.get("config"))
    except ZooError as err:
        raise ZooError(f"{str(cfg_path)!r} holds a bad config ({err}); rebuild the zoo") from None
    zoo = build(config, model=model, tokenizer=tokenizer, load_sources=False)
    zoo.mark_base_params(list(meta.get("base_params") or []))
    if not w_path.is_file():
        raise ZooError(f"{str(directory)!r} lacks {WEIGHTS_FILE}; the zoo folder is damaged, save it again")
    try:
        state = load_file(w_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ZooError(f"{str(w_path)!r} is not a readable safetensors file ({str(err).splitlines()[0]}); save the zoo again") from None
    zoo.load_zoo_state_dict(state, source=str(w_path))
    return zoo
