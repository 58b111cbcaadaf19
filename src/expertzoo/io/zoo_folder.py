"""The zoo folder: `zoo.json` (format version, config, base parameters the zoo carries) and `experts.safetensors`
(only what the zoo adds). Written atomically; read with one-line errors that say how to repair the folder."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import ZooError
from .atomic import atomic_dir, recover

FORMAT_VERSION = 1
CONFIG_FILE, WEIGHTS_FILE = "zoo.json", "experts.safetensors"


def check_output(directory: Path) -> None:
    """An existing zoo folder may be replaced, an empty folder filled; anything else is refused."""
    if directory.exists() and not (directory / CONFIG_FILE).is_file():
        if not directory.is_dir() or any(directory.iterdir()):
            raise ZooError(f"{str(directory)!r} exists and is not a zoo folder; choose an empty or new output folder")


def write_zoo_folder(directory: str | Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write `meta` (format_version added) as zoo.json and `tensors` as experts.safetensors, atomically."""
    directory = Path(directory)
    check_output(directory)
    with atomic_dir(directory) as tmp:
        text = json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True) + "\n"
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "expertzoo": str(FORMAT_VERSION)})
    return directory


def read_zoo_meta(directory: Path) -> dict[str, Any]:
    """zoo.json of a zoo folder (a write that was cut short is recovered first), its format version checked."""
    recover(directory)
    cfg_path = directory / CONFIG_FILE
    if not cfg_path.is_file():
        raise ZooError(f"{str(directory)!r} is not a zoo folder (no {CONFIG_FILE}); build one with `zoo build`")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ZooError(f"{str(cfg_path)!r} is not valid JSON; the zoo folder is damaged, rebuild it") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ZooError(f"{str(cfg_path)!r} has format_version {meta.get('format_version') if isinstance(meta, dict) else None!r}, "
                       f"this expertzoo reads {FORMAT_VERSION}; rebuild the zoo")
    return meta


def read_zoo_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of experts.safetensors."""
    w_path = directory / WEIGHTS_FILE
    if not w_path.is_file():
        raise ZooError(f"{str(directory)!r} lacks {WEIGHTS_FILE}; the zoo folder is damaged, save it again")
    try:
        return load_file(w_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ZooError(f"{str(w_path)!r} is not a readable safetensors file ({str(err).splitlines()[0]}); save the zoo again") from None
