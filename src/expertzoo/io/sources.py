"""Expert sources (`from:`): what a source is (expert folder, PEFT adapter, fine-tuned checkpoint), checks of a
checkpoint against the base, and the options a source imposes on its spec (a folder's recorded options, an
adapter's rank)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch.nn as nn
from pydantic import ValidationError

from ..config import ExpertSpec, ZooConfig, one_line
from ..errors import ZooError
from ..nn.sites import Site
from ..registry import EXPERTS
from .checkpoints import read_safetensors, safetensors_files
from .expert_folder import is_expert_folder, read_expert_meta
from .hub import is_hub_id, local_source
from .peft import is_peft_folder, is_projection

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


def param_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter (tied ones have several, e.g. lm_head.weight and model.embed_tokens.weight)."""
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def first_key(names: list[str], keys) -> str | None:
    return next((n for n in names if n in keys), None)


def _shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a checkpoint, from the safetensors headers alone."""
    out: dict[str, tuple[int, ...]] = {}
    for f in files:
        with read_safetensors(f) as h:
            out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
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
    key = first_key(param_aliases(model).get(id(embed.weight), []), shapes) if embed is not None else None
    rows = shapes.get(key) if key else None
    theirs, vocab = rows[0] if rows else cfg.get("vocab_size"), base.get("vocab_size")  # the embedding is the truth
    if vocab is not None and theirs is not None and theirs != vocab:
        raise ZooError(f"checkpoint {str(source)!r} has a vocabulary of {theirs} tokens, the base {vocab}: its "
                       "tokenizer differs; use checkpoints fine-tuned from the base with the base's tokenizer")


def resolve_spec(spec: ExpertSpec, model: nn.Module, site: Site | None = None) -> ExpertSpec:
    """Check the spec's source against the base (and its first site) and take the options its source imposes
    (a PEFT adapter's rank); a `kind: lora` PEFT adapter at block sites becomes a `block_lora` expert."""
    if spec.source is None:
        return spec
    if spec.kind == "lora" and is_peft_folder(spec.source) and site is not None and not is_projection(site.module):
        spec = ExpertSpec(**{**spec.to_dict(), "kind": "block_lora"})  # a PEFT adapter at a block: one expert of it
    if is_checkpoint(spec.source):
        check_checkpoint(spec.source, model, site)
    hook = getattr(EXPERTS.get(spec.kind), "options_from_source", None)
    imposed = hook(spec.source) if hook is not None else None
    if not imposed:
        return spec
    return ExpertSpec(**{**spec.to_dict(), **imposed})


SITE_NAME_RE = re.compile(r"^.*\.(\d+)\.([A-Za-z_][\w.]*)$")  # model.layers.24.mlp -> (24, mlp)


def folder_placement(meta: dict[str, Any]) -> dict[str, Any]:
    """The `sites` and `layers` an expert folder was trained at, from the site names it recorded
    (`model.layers.24.mlp` -> sites [mlp], layers [24]); {} when it recorded none."""
    found = [SITE_NAME_RE.match(n) for n in meta.get("sites") or [] if isinstance(n, str)]
    if not found or not all(found):
        return {}
    locals_ = list(dict.fromkeys(m.group(2) for m in found))
    return {"sites": locals_, "layers": sorted({int(m.group(1)) for m in found})}


def folder_options(spec: ExpertSpec) -> ExpertSpec:
    """A Hub id in `from:` becomes its local snapshot folder; then options an expert folder recorded
    (`zoo train-expert`, save_expert) fill in those a `from: DIR` spec left at the kind's defaults; options the config
    sets to other values win (e.g. fewer DiT sampling steps). The folder's own sites and layers place the expert
    where the spec names none (each of `sites`, `layers` on its own)."""
    if spec.source is not None and is_hub_id(spec.source):
        spec = ExpertSpec(**{**spec.to_dict(), "from": local_source(spec.source)})
    if spec.source is None or not is_expert_folder(spec.source):
        return spec
    meta = read_expert_meta(spec.source)
    if meta["kind"] != spec.kind:
        return spec  # loading it reports the kind mismatch
    defaults = {k: f.default for k, f in EXPERTS.get(spec.kind).Options.model_fields.items()}
    saved = meta.get("options") if isinstance(meta.get("options"), dict) else {}
    options = spec.options.model_dump()
    merged = {k: saved[k] if k in saved and v == defaults.get(k) else v for k, v in options.items()}
    placed = {k: v for k, v in folder_placement(meta).items() if getattr(spec, k) is None}
    if merged == options and not placed:
        return spec
    try:
        return ExpertSpec(**{**spec.to_dict(), **merged, **placed})
    except ValidationError as err:
        raise ZooError(f"expert folder {spec.source!r} records bad options ({one_line(err)}); re-save the expert") from None


def with_folder_options(config: ZooConfig) -> ZooConfig:
    specs = [folder_options(s) for s in config.experts]
    return config if specs == list(config.experts) else config.model_copy(update={"experts": specs})
