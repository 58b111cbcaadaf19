"""Helpers shared by sub-commands: loading a zoo or a base, writing JSON atomically, tables."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from ..atomic import atomic_write_text
from ..base_models import load_base
from ..merge import load_adapter_model
from ..peft_io import is_peft_folder
from ..zoo import CONFIG_FILE, Zoo, load

console = Console(highlight=False, emoji=False)


def load_model(spec: str) -> tuple[Any, Any]:
    """A zoo folder -> (zoo, tokenizer); a PEFT adapter folder -> (its PeftModel on its base, tokenizer);
    anything else is a base spec -> (model, tokenizer)."""
    if (Path(spec) / CONFIG_FILE).is_file():
        zoo = load(spec)
        return zoo, zoo.tokenizer
    if is_peft_folder(spec):
        return load_adapter_model(spec)
    return load_base(spec)


def write_json(data: Any, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_zoo(model: Any) -> bool:
    return isinstance(model, Zoo)
