"""Reading weights from checkpoints: safetensors only (memory-mapped), never pickles."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open

from ..errors import ZooError
from ..nn.sites import Site

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint file or folder; a clear error for anything else."""
    path = Path(path)
    if not path.exists():
        raise ZooError(f"checkpoint {str(path)!r} does not exist; give a .safetensors file or a model folder")
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".safetensors" for f in files):
        bad = next((f for f in (files or path.iterdir() if path.is_dir() else files) if f.suffix in PICKLE_SUFFIXES), path)
        raise ZooError(f"checkpoint {str(bad)!r} is not safetensors; only .safetensors weights are loaded "
                       "(convert with save_pretrained(safe_serialization=True))")
    return files


@contextlib.contextmanager
def read_safetensors(path: Path, *, what: str = "checkpoint", fix: str = "re-save it") -> Iterator[Any]:
    """`safe_open(path)` (memory-mapped); a file that cannot be read raises one ZooError naming it and the fix."""
    try:
        with safe_open(path, framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as err:
        prefix = f"{what} " if what else ""
        raise ZooError(f"{prefix}{str(path)!r} is not a readable safetensors file ({err}); {fix}") from None


def load_site_module(module: nn.Module, source: str | Path, site: Site) -> None:
    """Fill `module` (a copy of the site's base module) with the tensors `{site.name}.*` of a checkpoint."""
    wanted = {f"{site.name}.{k}": k for k in module.state_dict()}
    found: dict[str, torch.Tensor] = {}
    for f in safetensors_files(source):
        with read_safetensors(f) as handle:
            for key in wanted.keys() & set(handle.keys()):
                found[wanted[key]] = handle.get_tensor(key)
    load_checked(module, found, what=f"checkpoint {str(source)!r}", site_name=site.name,
                 missing_hint="it must be a fine-tuned copy of the base's architecture",
                 shape_hint="train it on the same base")


def load_checked(module: nn.Module, found: dict[str, torch.Tensor], *, what: str, site_name: str,
                 missing_hint: str, shape_hint: str) -> None:
    """Load `found` into `module` after checking every tensor is there, of the right shape, and finite;
    on any error nothing is loaded."""
    own = module.state_dict()
    missing = sorted(set(own) - set(found))
    if missing:
        raise ZooError(f"{what} has no tensor {site_name}.{missing[0]}; {missing_hint}")
    for key, t in found.items():
        if t.shape != own[key].shape:
            raise ZooError(f"{what}: {site_name}.{key} has shape {tuple(t.shape)}, expected {tuple(own[key].shape)}; "
                           f"{shape_hint}")
        if not torch.isfinite(t).all():
            raise ZooError(f"{what}: {site_name}.{key} holds NaN or Inf values")
    module.load_state_dict({k: t.to(own[k].dtype) for k, t in found.items()})
