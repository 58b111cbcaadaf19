"""Expert folders: `expert.json` (name, kind, options, base, sites) + `expert.safetensors` (tensors keyed
`{site}.{parameter}`), written by `Zoo.save_expert` / `zoo train-expert` and read by `{kind, from: DIR}`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import ZooError
from .atomic import atomic_dir
from .checkpoints import load_checked, read_safetensors

META, WEIGHTS = "expert.json", "expert.safetensors"


def is_expert_folder(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def write_expert_folder(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write one expert's folder."""
    with atomic_dir(directory) as tmp:
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS)
    return Path(directory)


def read_expert_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ZooError(f"{str(path)!r} is missing or not valid JSON; re-save the expert with `zoo train-expert`") from None
    if not isinstance(meta, dict) or "kind" not in meta:
        raise ZooError(f"{str(path)!r} lacks the expert's `kind`; re-save the expert")
    return meta


def load_expert_folder(expert: torch.nn.Module, directory: str | Path, site_name: str, kind: str) -> None:
    """Fill `expert` with the tensors `{site_name}.*` of an expert folder; checks kind, presence, shape, finiteness."""
    meta = read_expert_meta(directory)
    if meta["kind"] != kind:
        raise ZooError(f"expert folder {str(directory)!r} holds a {meta['kind']!r} expert, the config says {kind!r}; "
                       f"set kind: {meta['kind']}")
    own = expert.state_dict()
    path = Path(directory) / WEIGHTS
    with read_safetensors(path, what="", fix="re-save the expert") as f:
        keys = set(f.keys())
        found = {k: f.get_tensor(f"{site_name}.{k}") for k in own if f"{site_name}.{k}" in keys}
    load_checked(expert, found, what=f"expert folder {str(directory)!r}", site_name=site_name,
                 missing_hint=f"it was trained on other sites or layers (it has: {', '.join(meta.get('sites', [])) or '?'})",
                 shape_hint="use the same options and base as when it was trained")
