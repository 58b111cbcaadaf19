"""`zoo export DIR --format mixtral|qwen3_moe|zoo -o OUT`: a folder plain transformers (and vLLM, for the MoE
formats) loads with AutoModelForCausalLM.from_pretrained, tokenizer included."""
from __future__ import annotations

from pathlib import Path

from ..errors import ZooError
from .common import console

FORMAT_NAMES = ("gguf", "mixtral", "qwen3_moe", "zoo")  # expertzoo.export.FORMATS (a test keeps them equal)


def register(sub) -> None:
    p = sub.add_parser("export", help="export a zoo as a Mixtral / Qwen3-MoE checkpoint or as the `zoo` model type")
    p.add_argument("dir", help="zoo folder")
    p.add_argument("--format", required=True, choices=FORMAT_NAMES,
                   help="mixtral (Llama/Mistral bases), qwen3_moe (Qwen3 bases): zoos of ffn experts at the MLP "
                        "blocks with a learned or uniform router; zoo: any zoo (load it after `import expertzoo`)")
    p.add_argument("-o", "--out", required=True, help="output folder (new or empty)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..build.load import load
    from ..export import export

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ZooError(f"{args.out!r} exists and is not empty; choose a new or empty output folder")
    notes = export(load(args.dir), out, args.format)
    for note in notes:
        console.print(f"note: {note}")
    console.print(f"exported {args.dir} as {args.format} -> {args.out}")
    return 0
