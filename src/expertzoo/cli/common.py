"""Helpers shared by sub-commands: loading a zoo or a base, writing JSON atomically, tables, and the processes
a command was launched as."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from rich.console import Console

from ..io.atomic import atomic_write_text
from ..io.base_models import load_base
from ..extras.merge import load_adapter_model
from ..io.peft import is_peft_folder
from ..build.load import load
from ..io.zoo_folder import CONFIG_FILE
from ..zoo import Zoo

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


def processes() -> PartialState:
    """The processes this command was launched as (torchrun, accelerate launch; one process alone: rank 0 of 1).
    Every rank runs the command (the training loop splits each batch among them); only the main process
    (`is_main_process`) writes the output and prints, then `wait_for_everyone()` holds the other ranks until it
    is written."""
    return PartialState(cpu=not torch.cuda.is_available())  # as train.fit's Accelerator: gloo on CPU
