"""Merging PEFT LoRA adapters into one adapter, a baseline for zoos: PEFT's own add_weighted_adapter (linear,
TIES, cat, SVD variants) on the base, written as a PEFT adapter folder that records its base spec (zoo_merge.json),
so `zoo eval OUT` finds the base again."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..io.atomic import atomic_dir
from ..io.base_models import load_base
from ..errors import ZooError
from ..io.peft import WEIGHTS, building_peft_model, expert_options, is_peft_folder, read_config

MERGE_INFO = "zoo_merge.json"
METHODS = ("linear", "ties", "cat", "svd", "ties_svd")  # names of PEFT's combination types
SAME_RANK = ("linear", "ties")  # PEFT merges these factor by factor, so every adapter needs one rank
DENSITY = ("ties", "ties_svd")


def _check(adapters: list[str], method: str, weights: list[float]) -> None:
    if method not in METHODS:
        raise ZooError(f"unknown merge method {method!r}; choose one of: {', '.join(METHODS)}")
    if len(adapters) < 1 or len(weights) != len(adapters):
        raise ZooError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter")
    ranks = [expert_options(a)["rank"] for a in adapters]  # also checks that each is a plain LoRA adapter
    if method in SAME_RANK and len(set(ranks)) > 1:
        raise ZooError(f"adapters have ranks {ranks}; --method {method} needs one rank (PEFT merges A and B factor by "
                       "factor); use --method cat (exact weighted sum, ranks add up) or svd")


def merge_adapters(base: str, adapters: list[str], out: str | Path, *, method: str = "linear",
                   weights: list[float] | None = None, density: float = 0.5) -> Path:
    """One PEFT adapter from `adapters` (folders), all trained on base spec `base`; `weights` default to 1/n each."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    weights = list(weights) if weights else [1.0 / len(adapters)] * len(adapters)
    _check(adapters, method, weights)
    out = Path(out)
    if out.exists() and not is_peft_folder(out) and (not out.is_dir() or any(out.iterdir())):
        raise ZooError(f"{str(out)!r} exists and is not an adapter folder; choose a new or empty output folder")
    model, tokenizer = load_base(base)
    names = [f"a{i}" for i in range(len(adapters))]
    with building_peft_model():
        peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    kw = {"density": density} if method in DENSITY else {}
    try:
        peft_model.add_weighted_adapter(names, weights, "merged", combination_type=method, **kw)
    except (ValueError, TypeError) as err:
        raise ZooError(f"PEFT cannot merge these adapters with --method {method}: {str(err).splitlines()[0]}") from None
    config = peft_model.peft_config["merged"]
    config.base_model_name_or_path = base
    config.use_rslora = False  # merged factors carry their scaling; PEFT sets lora_alpha = r for scale 1
    tensors = get_peft_model_state_dict(peft_model, adapter_name="merged", save_embedding_layers=False)
    info = {"base": base, "method": method, "adapters": [str(a) for a in adapters], "weights": weights,
            **({"density": density} if kw else {})}
    with atomic_dir(out) as tmp:
        config.save_pretrained(str(tmp))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / WEIGHTS, metadata={"format": "pt"})
        (tmp / MERGE_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tokenizer.save_pretrained(str(tmp))
    return Path(out)


def adapter_base(path: str | Path) -> str:
    """The base spec of an adapter folder: recorded by `zoo merge`, else its base_model_name_or_path."""
    info = Path(path) / MERGE_INFO
    if info.is_file():
        return json.loads(info.read_text(encoding="utf-8"))["base"]
    name = read_config(path).get("base_model_name_or_path")
    if not name:
        raise ZooError(f"adapter {str(path)!r} does not say which base it was trained on; set "
                       "base_model_name_or_path in its adapter_config.json to a base spec (e.g. smollm2-135m)")
    return KNOWN_BASES.get(name, name)


KNOWN_BASES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}  # hub names of bases we have offline


def load_adapter_model(path: str | Path):
    """(PeftModel, tokenizer) of an adapter folder on its base, ready to evaluate or generate."""
    from peft import PeftModel

    read_config(path)
    base = adapter_base(path)
    try:
        model, tokenizer = load_base(base)
    except ZooError as err:
        raise ZooError(f"adapter {str(path)!r} names base {base!r}, which cannot be loaded here ({err})") from None
    with building_peft_model():
        return PeftModel.from_pretrained(model, str(path)).eval(), tokenizer
