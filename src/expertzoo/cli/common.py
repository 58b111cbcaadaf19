"""Helpers shared by sub-commands: the help format, the `NAME=PATH` data convention, checks of outputs and numbers
made before any heavy work, loading a zoo or a base, JSON output, and the processes a command was launched as.
Only the standard library and rich are imported here; torch and transformers are imported by the helpers that
need them, when a command runs."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from ..errors import ZooError

console = Console(highlight=False, emoji=False)
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's format, with every option's default shown unless its help already states it (or it has none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def warn(message: str) -> None:
    """One line on stderr that does not stop the command."""
    print(f"zoo: warning: {message}", file=sys.stderr)


def positive(value: str) -> int:
    """argparse type: an integer >= 1."""
    return _integer(value, 1)


def non_negative(value: str) -> int:
    """argparse type: an integer >= 0."""
    return _integer(value, 0)


def _integer(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"{value} is below {least}; give {least} or more")
    return number


def add_data(p: argparse.ArgumentParser, flag: str = "--data", *, required: bool = True, text: str) -> None:
    """A data option in the one convention of every command: `NAME=PATH` or a bare `PATH` (named by its file stem),
    several after one flag or the flag repeated."""
    p.add_argument(flag, nargs="+", action="extend", required=required, default=[] if not required else None,
                   metavar="NAME=PATH", help=f"{text}; NAME=PATH or PATH (named by its file stem), repeatable")


def named_paths(items: list[str], flag: str = "--data") -> dict[str, str]:
    """`NAME=PATH` / `PATH` items to {name: path}, every file checked to exist and every name to be new."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path or not NAME_RE.fullmatch(name):
            raise ZooError(f"{flag} {item!r} must look like NAME=PATH or PATH, e.g. code=held_out.txt")
        if not Path(path).is_file():
            where = f"{flag} {item!r}: file {path!r}" if sep else f"{flag} file {path!r}"
            raise ZooError(f"{where} does not exist; give the path of a .txt or .jsonl file")
        if name in out:
            raise ZooError(f"{flag} names dataset {name!r} twice ({out[name]}, {path}); name them apart, "
                           f"e.g. {name}2={path}")
        out[name] = path
    return out


def key_values(items: list[str], flag: str, example: str) -> dict[str, Any]:
    """`KEY=VALUE` items to a dict, values read as YAML scalars (16 -> int, 0.5 -> float, silu -> str); a key
    given twice is an error."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ZooError(f"{flag} {item!r} must look like KEY=VALUE, e.g. {example}")
        if key in out:
            raise ZooError(f"{flag} gives {key!r} twice; keep one {key}=VALUE")
        out[key] = yaml.safe_load(value) if value.strip() else value
    return out


def check_output(out: str | Path, *, force: bool, marker: str = "zoo.json", what: str = "zoo") -> Path:
    """The output folder may be new or empty; an existing `what` folder (holding `marker`) is replaced only with
    --force (atomically, when the new one is whole); anything else is refused."""
    out = Path(out)
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    if out.is_dir() and (out / marker).is_file():
        if force:
            return out
        raise ZooError(f"{str(out)!r} is already a {what} folder; pass --force to replace it, or choose another -o")
    raise ZooError(f"{str(out)!r} exists and is not a {what} folder; choose an empty or new output folder")


def add_output(p: argparse.ArgumentParser, what: str = "zoo") -> None:
    """-o OUT and --force (replace an existing `what` folder there)."""
    p.add_argument("-o", "--out", required=True, help=f"output {what} folder (new or empty)")
    p.add_argument("--force", action="store_true", help=f"replace OUT if it is already a {what} folder")


DTYPES = ("float32", "bfloat16", "float16")


def add_dtype(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="run the base and the experts in this dtype (routers stay float32)")


def load_model(spec: str, dtype: str = "float32") -> tuple[Any, Any]:
    """A zoo folder -> (zoo, tokenizer); a PEFT adapter folder -> (its PeftModel on its base, tokenizer);
    anything else is a base spec -> (model, tokenizer). A folder that is none of these is a clear error.
    `dtype`: the model cast once loaded (a zoo's routers stay float32)."""
    import torch

    model, tok = _load_model(spec)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    return model, tok


def _load_model(spec: str) -> tuple[Any, Any]:
    from ..build.load import load
    from ..extras.merge import load_adapter_model
    from ..io.base_models import load_base
    from ..io.peft import is_peft_folder
    from ..io.zoo_folder import CONFIG_FILE

    if (Path(spec) / CONFIG_FILE).is_file():
        zoo = load(spec)
        return zoo, zoo.tokenizer
    if is_peft_folder(spec):
        return load_adapter_model(spec)
    path = Path(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ZooError(f"{spec!r} is not a zoo folder (no {CONFIG_FILE}), a PEFT adapter or a model folder (no "
                       "config.json); give a folder made by `zoo build`, or a base such as smollm2-135m")
    return load_base(spec)


def write_json(data: Any, path: str | Path) -> None:
    from ..io.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_zoo(model: Any) -> bool:
    from ..zoo import Zoo

    return isinstance(model, Zoo)


def pad_id(tokenizer: Any) -> int:
    """expertzoo.data.pad_id, imported when first needed (the data package imports torch)."""
    from ..data import pad_id as data_pad_id

    return data_pad_id(tokenizer)


def add_prefix_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="run the frozen layers below the first site on every forward instead of reading their output "
                        "from the cache folder (computed once per base, layer and data; same results)")


def prefix_for(model: Any, examples: list[Any], *, enabled: bool, progress: bool = True) -> Any:
    """The PrefixCache of `examples` below a zoo's first site, stored under the cache folder; None when disabled,
    not a zoo, on a quantized base, or when nothing lies below the first site (see expertzoo/data/hidden.py)."""
    if not enabled or not is_zoo(model) or model.zoo_config.quantize != "none":
        return None
    from ..data.hidden import prefix_cache
    from ..io.base_models import cache_dir

    return prefix_cache(model.model, [layer.site.layer for layer in model.layers], examples,
                        pad_id=pad_id(model.tokenizer), folder=cache_dir() / "prefix", progress=progress)


def processes() -> Any:
    """The processes this command was launched as (torchrun, accelerate launch; one process alone: rank 0 of 1),
    an accelerate PartialState. Every rank runs the command (the training loop splits each batch among them); only
    the main process (`is_main_process`) writes the output and prints, then `wait_for_everyone()` holds the other
    ranks until it is written."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # as train.fit's Accelerator: gloo on CPU


def plural(n: int, noun: str) -> str:
    """`1 expert`, `2 experts`, `1,024 added parameters`."""
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def table(*headers: str, title: str | None = None) -> Any:
    """A rich table with these column headers; print it with `show`."""
    from rich.table import Table

    return Table(*headers, title=title)


def show(out: Any) -> None:
    """Print a table at its natural width, even where that is wider than the terminal (or than the 80 columns
    assumed when output goes to a file), so no header or cell is cut ("validati…")."""
    from rich.measure import Measurement

    width = Measurement.get(console, console.options.update_width(10_000), out).maximum
    if width <= console.width:
        console.print(out)
        return
    Console(highlight=False, emoji=False, width=width, file=console.file, force_terminal=console.is_terminal,
            color_system=console.color_system).print(out)


def load_data(paths: dict[str, str], tokenizer: Any, max_len: int, limit: int | None = None) -> list[Any]:
    """The examples of every file of `paths`, in order, mixed into one list (`limit` applies per file)."""
    from ..data import load_examples

    return [e for path in paths.values() for e in load_examples(path, tokenizer, max_len, limit)]
