"""Assembling zoos from what users already have: fine-tuned checkpoints checked against the base, expert options
taken from their sources (a PEFT adapter's rank), Branch-Train-Mix averaging of the non-expert parameters, router
initialisation, and the `from_models` / `from_adapters` shortcuts."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from .checkpoints import safetensors_files
from .config import ExpertSpec, ZooConfig
from .errors import ZooError
from .experts import EXPERTS
from .experts.folder import is_expert_folder
from .peft_io import is_peft_folder
from .sites import Site, find_sites

if TYPE_CHECKING:
    from .zoo import Zoo

# config keys that must agree between a fine-tuned checkpoint and the base (when both state them)
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "hidden_act", "n_embd", "n_layer", "n_head", "n_inner")


def is_checkpoint(source: str | Path) -> bool:
    """A full model checkpoint: a .safetensors file, or a folder of them that is no expert or adapter folder."""
    path = Path(source)
    if path.is_file():
        return path.suffix == ".safetensors"
    return path.is_dir() and not is_expert_folder(path) and not is_peft_folder(path) and \
        (any(path.glob("*.safetensors")) or (path / "config.json").is_file())


def _checkpoint_config(path: Path) -> dict[str, Any] | None:
    file = (path if path.is_dir() else path.parent) / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ZooError(f"{str(file)!r} is not valid JSON; save the checkpoint again with save_pretrained") from None


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (tied ones have several, e.g. lm_head.weight and model.embed_tokens.weight)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _find(names: list[str], keys) -> str | None:
    return next((n for n in names if n in keys), None)


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint, from the safetensors headers alone."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        try:
            with safe_open(f, framework="pt") as h:
                out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
        except (SafetensorError, OSError) as err:
            raise ZooError(f"checkpoint {str(f)!r} is not a readable safetensors file ({err}); re-save it") from None
    return out


def _site_evidence(shapes: dict[str, tuple[int, ...]], site: Site) -> str:
    """' (model.layers.0.mlp.gate_proj.weight has shape ...)' for the first tensor of the site that differs."""
    for key, t in site.module.state_dict().items():
        name = f"{site.name}.{key}"
        if name not in shapes:
            return f" (it has no tensor {name})"
        if shapes[name] != tuple(t.shape):
            return f" ({name} has shape {shapes[name]} but the base's is {tuple(t.shape)})"
    return ""


def check_checkpoint(source: str | Path, model: nn.Module, site: Site | None = None) -> None:
    """Refuse a checkpoint of another architecture or vocabulary than the base, naming what differs (the config
    key, and the first tensor of `site` that does not fit)."""
    path, base = Path(source), model.config.to_dict()
    cfg, shapes = _checkpoint_config(path) or {}, _shapes(safetensors_files(path))
    evidence = _site_evidence(shapes, site) if site is not None else ""
    differ = next((k for k in ARCH_KEYS if k in cfg and k in base and cfg[k] != base[k]), None)
    if differ or evidence:
        what = f"{differ}={cfg[differ]!r} but the base has {base[differ]!r}" if differ else "tensors differ"
        raise ZooError(f"checkpoint {str(source)!r} is not a fine-tuned copy of the base's architecture: {what}"
                       f"{evidence}; use checkpoints fine-tuned from the same base")
    embed = model.get_input_embeddings()
    key = _find(_aliases(model).get(id(embed.weight), []), shapes) if embed is not None else None
    rows = shapes.get(key) if key else None
    theirs, vocab = rows[0] if rows else cfg.get("vocab_size"), base.get("vocab_size")  # the embedding is the truth
    if vocab is not None and theirs is not None and theirs != vocab:
        raise ZooError(f"checkpoint {str(source)!r} has a vocabulary of {theirs} tokens, the base {vocab}: its "
                       "tokenizer differs; use checkpoints fine-tuned from the base with the base's tokenizer")


def resolve_spec(spec: ExpertSpec, model: nn.Module, site: Site | None = None) -> ExpertSpec:
    """Check the spec's source against the base (and its first site) and take the options its source imposes
    (a PEFT adapter's rank)."""
    if spec.source is None:
        return spec
    if is_checkpoint(spec.source):
        check_checkpoint(spec.source, model, site)
    hook = getattr(EXPERTS.get(spec.kind), "options_from_source", None)
    imposed = hook(spec.source) if hook is not None else None
    if not imposed:
        return spec
    return ExpertSpec(**{**spec.to_dict(), **imposed})


def prepare_config(config: ZooConfig, model: nn.Module) -> ZooConfig:
    """The config a fresh build uses: sources checked, options their sources impose filled in."""
    from .router_init import check_init

    sites = find_sites(model, config.sites, config.layer_indices(model.config.num_hidden_layers))
    specs = [resolve_spec(s, model, sites[0] if sites else None) for s in config.experts]
    if config.non_expert_params == "average" and not [s for s in specs if s.source and is_checkpoint(s.source)]:
        raise ZooError("non_expert_params: average needs experts with `from:` fine-tuned checkpoints to average; "
                       "add them or use non_expert_params: base")
    check_init(config)
    if specs == list(config.experts):
        return config
    return config.model_copy(update={"experts": specs})


def finish_build(zoo: "Zoo") -> None:
    """After the experts are in: average the non-expert parameters if asked, then initialise the router."""
    from .router_init import init_router

    if zoo.zoo_config.non_expert_params == "average":
        sources = [s.source for s in zoo.zoo_config.experts if s.source and is_checkpoint(s.source)]
        average_non_expert_params(zoo, sources)
    init_router(zoo)


def _key_files(source: str) -> dict[str, Path]:
    """Tensor name -> the safetensors file of a (possibly sharded) checkpoint that holds it (headers only)."""
    out: dict[str, Path] = {}
    for f in safetensors_files(source):
        try:
            with safe_open(f, framework="pt") as h:
                out.update({k: f for k in h.keys()})
        except (SafetensorError, OSError) as err:
            raise ZooError(f"checkpoint {str(f)!r} is not a readable safetensors file ({err}); re-save it") from None
    return out


def _read(file: Path, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as h:  # opened per tensor: only this tensor's pages are ever mapped
        return h.get_tensor(key)


@torch.no_grad()
def average_non_expert_params(zoo: "Zoo", sources: list[str]) -> list[str]:
    """Set every base parameter outside the sites to its mean over the checkpoints (one tensor in memory at a
    time); they are saved with the zoo. Returns their names."""
    at_sites = {id(p) for layer in zoo.layers for p in layer.parameters()}
    names = [(n, p) for n, p in zoo.model.named_parameters() if id(p) not in at_sites]
    aliases, index = _aliases(zoo.model), [_key_files(s) for s in sources]
    for name, param in names:
        total = param.data if param.dtype == torch.float32 else torch.empty(param.shape)  # sums in place, fp32
        for i, (source, keys) in enumerate(zip(sources, index)):
            key = _find(aliases[id(param)], keys)  # a tied weight may be stored under any of its names
            if key is None:
                raise ZooError(f"checkpoint {source!r} lacks {name}; non_expert_params: average needs full "
                               "checkpoints of the base's architecture (or use non_expert_params: base)")
            t = _read(keys[key], key)
            if t.shape != param.shape or not torch.isfinite(t).all():
                raise ZooError(f"checkpoint {source!r}: {name} has shape {tuple(t.shape)} (base {tuple(param.shape)}) "
                               "or non-finite values; use checkpoints fine-tuned from the base")
            total.copy_(t) if i == 0 else total.add_(t.to(total.dtype))
            del t
        param.copy_(total.div_(len(sources)))
    zoo.mark_base_params([n for n, _ in names])
    return [n for n, _ in names]


def from_models(base: str, checkpoints: dict[str, str], *, sites: list[str] | None = None,
                non_expert_params: str = "base", router: dict[str, Any] | None = None, **config: Any) -> "Zoo":
    """A zoo of `ffn` experts, one per fine-tuned checkpoint {name: path}, at `sites` (default the MLP blocks)."""
    from .zoo import build

    experts = [{"name": n, "kind": "ffn", "from": str(p)} for n, p in checkpoints.items()]
    return build({"base": base, "sites": sites or ["mlp"], "experts": experts, "non_expert_params": non_expert_params,
                  "router": router or {"kind": "learned"}, **config})


def from_adapters(base: str, adapters: dict[str, str], *, sites: list[str], router: dict[str, Any] | None = None,
                  **config: Any) -> "Zoo":
    """A zoo of `lora` experts, one per PEFT adapter folder {name: path}, at projection `sites`."""
    from .zoo import build

    experts = [{"name": n, "kind": "lora", "from": str(p)} for n, p in adapters.items()]
    return build({"base": base, "sites": sites, "experts": experts, "router": router or {"kind": "learned"}, **config})
