"""Helpers shared by sub-commands: loading a zoo or a base, writing JSON atomically, tables."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from ..base_models import load_base
from ..zoo import CONFIG_FILE, Zoo, load

console = Console(highlight=False, emoji=False)


def load_model(spec: str) -> tuple[Any, Any]:
    """A zoo folder -> (zoo, tokenizer); anything else is a base spec -> (model, tokenizer)."""
    if (Path(spec) / CONFIG_FILE).is_file():
        zoo = load(spec)
        return zoo, zoo.tokenizer
    return load_base(spec)


def write_json(data: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def is_zoo(model: Any) -> bool:
    return isinstance(model, Zoo)
