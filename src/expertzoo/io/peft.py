"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors): read one site's A and B with
the adapter's own scaling folded in, and write a zoo's LoRA expert as an adapter `peft.PeftModel` loads."""
from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save_file

from ..errors import ZooError
from .atomic import atomic_dir
from .checkpoints import read_safetensors

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: base_model.model.<module path>.lora_A.weight
# transformers' deprecated property that peft itself reads while it wraps a model (not a call of ours to fix)
PEFT_READS_DEPRECATED = "`is_gradient_checkpointing` is deprecated"


@contextlib.contextmanager
def building_peft_model():
    """Wrap the construction of a PEFT model (`PeftModel.from_pretrained`, `get_peft_model`, ...): silences exactly
    the FutureWarning that peft's own code triggers in transformers, and nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=PEFT_READS_DEPRECATED, category=FutureWarning)
        yield


UNSUPPORTED = {  # adapter_config key -> (value that is fine, what to say)
    "use_dora": (False, "DoRA adapters (use_dora: true) rescale the base weight"),
    "bias": ("none", "adapters that train biases (bias != none)"),
    "lora_bias": (False, "adapters with a LoRA bias (lora_bias: true)"),
    "modules_to_save": (None, "adapters that train whole modules (modules_to_save)"),
    "target_parameters": (None, "adapters that target nn.Parameters (target_parameters)"),
    "trainable_token_indices": (None, "adapters that train token embeddings (trainable_token_indices)"),
}


def is_peft_folder(path: str | Path) -> bool:
    """A folder with PEFT's adapter_config.json or adapter_model.safetensors (one without the other is a damaged
    adapter, reported as such, not taken for a model checkpoint)."""
    return (Path(path) / CONFIG).is_file() or (Path(path) / WEIGHTS).is_file()


def _index(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _count(v: Any) -> bool:
    return _index(v) and v >= 1


def _positive(v: Any) -> bool:
    try:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    except OverflowError:  # an int beyond any float
        return False


def _patterns(v: Any, ok) -> bool:
    """A {module pattern: value} map as PEFT writes rank_pattern / alpha_pattern (keys are regular expressions)."""
    if not isinstance(v, dict) or not all(ok(x) for x in v.values()):
        return False
    try:
        for key in v:
            re.compile(key)
    except re.error:
        return False
    return True


FIELDS = {  # adapter_config key -> (check of a value PEFT would write, what it must be); None means the default
    "r": (_count, "a whole number >= 1"),
    "lora_alpha": (_positive, "a finite number > 0"),
    "use_rslora": (lambda v: isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: isinstance(v, bool), "true or false"),
    "rank_pattern": (lambda v: _patterns(v, _count), "a map of module patterns to ranks >= 1"),
    "alpha_pattern": (lambda v: _patterns(v, _positive), "a map of module patterns to alphas > 0"),
    "target_modules": (lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(t, str) for t in v),
                       "a module name pattern or a list of module names"),
    "layers_to_transform": (lambda v: _index(v) or isinstance(v, list) and all(_index(i) for i in v),
                            "a layer index or a list of layer indices"),
}


def read_config(path: str | Path) -> dict[str, Any]:
    """The adapter's config, checked to be a plain LoRA a LoRA expert can hold."""
    file = Path(path) / CONFIG
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise ZooError(f"{str(file)!r} is missing or not valid JSON; save the adapter again with save_pretrained") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        got = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ZooError(f"adapter {str(path)!r} has peft_type {got!r}; only LoRA adapters (peft_type: LORA) load as lora experts")
    for key, (fine, what) in UNSUPPORTED.items():
        if cfg.get(key) not in (fine, None, [], {}):
            raise ZooError(f"adapter {str(path)!r}: {what} cannot be held by a lora expert; "
                           f"retrain it without {key}")
    for key, (ok, what) in FIELDS.items():
        if cfg.get(key) is not None and not ok(cfg[key]):
            shown = repr(cfg[key])
            raise ZooError(f"{str(file)!r}: {key} is {shown[:60] + '...' if len(shown) > 60 else shown}, not {what}; "
                           "save the adapter again with save_pretrained")
    return cfg


def module_rank(cfg: dict[str, Any], module: str) -> int:
    """PEFT's rank of one module: its rank_pattern entry, else r."""
    from peft.utils.other import get_pattern_key

    patterns = cfg.get("rank_pattern") or {}
    default = cfg["r"] if cfg.get("r") is not None else 8
    return patterns.get(get_pattern_key(list(patterns), module), default) if patterns else default


def scale_of(cfg: dict[str, Any], rank: int, module: str | None = None) -> float:
    """PEFT's scaling of one module: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (alpha_pattern honoured)."""
    from peft.utils.other import get_pattern_key

    alpha = float(cfg["lora_alpha"] if cfg.get("lora_alpha") is not None else 8)
    patterns = cfg.get("alpha_pattern") or {}
    if module is not None and patterns:
        alpha = float(patterns.get(get_pattern_key(list(patterns), module), alpha))
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def expert_options(path: str | Path) -> dict[str, Any]:
    """`rank` and `alpha` of a lora expert that holds this adapter: the largest rank of its tensors (smaller ones
    are zero-padded; each must be the rank its config gives that module) and an alpha giving the adapter's default
    scaling at that rank. Reads the safetensors header only."""
    cfg = read_config(path)
    ranks = _tensor_ranks(Path(path))
    for module, rank in ranks.items():
        if rank != module_rank(cfg, module):
            raise ZooError(f"adapter {str(path)!r}: {module} has LoRA rank {rank} but its {CONFIG} gives it rank "
                           f"{module_rank(cfg, module)} (r / rank_pattern); save the adapter again with save_pretrained")
    rank = max(ranks.values())
    return {"rank": rank, "alpha": scale_of(cfg, cfg["r"] if cfg.get("r") is not None else 8) * rank}


def adapted_projections(path: str | Path) -> list[str]:
    """The projection names (last part of each module path: q_proj, down_proj, ...) the adapter has LoRA factors
    for, from the safetensors header."""
    return sorted({module.rpartition(".")[2] for module in _tensor_ranks(Path(path))})


def leaves_alone(path: str | Path, site_name: str, block: str) -> bool:
    """Whether the adapter has no LoRA at projection `site_name` but has one at another projection of `block` (an
    adapter on q_proj and v_proj leaves k_proj and o_proj of its attention blocks alone)."""
    modules = _tensor_ranks(Path(path))
    return site_name not in modules and any(m.startswith(block + ".") for m in modules)


def _tensor_ranks(path: Path) -> dict[str, int]:
    """{module: rank} of the adapter's LoRA factors, from the safetensors header; A [r, d_in] and B [d_out, r]
    must be matrices of one rank."""
    file = _weights_file(path)
    with read_safetensors(file, what="", fix="save the adapter again") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    ranks = {}
    for key, a in shapes.items():
        if not (key.startswith(PREFIX) and key.endswith(".lora_A.weight")):
            continue
        module = key[len(PREFIX):-len(".lora_A.weight")]
        b = shapes.get(f"{PREFIX}{module}.lora_B.weight")
        if b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
            raise ZooError(f"adapter {str(path)!r}: {module} has lora_A {tuple(a)} and lora_B "
                           f"{tuple(b) if b is not None else 'missing'}; they must be [r, d_in] and [d_out, r]; "
                           "save the adapter again with save_pretrained")
        ranks[module] = a[0]
    if not ranks:
        raise ZooError(f"{str(file)!r} holds no LoRA factors ({PREFIX}<module>.lora_A.weight); "
                       "save the adapter again with save_pretrained")
    return ranks


def _weights_file(path: Path) -> Path:
    file = path / WEIGHTS
    if not file.is_file():
        bin_file = path / "adapter_model.bin"
        what = f"holds only the pickled {bin_file.name}" if bin_file.is_file() else f"has no {WEIGHTS}"
        raise ZooError(f"adapter {str(path)!r} {what}; save it with save_pretrained(safe_serialization=True)")
    return file


def _adapter_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    file = _weights_file(path)
    with read_safetensors(file, what="", fix="save the adapter again") as f:
        present = set(f.keys())
        return {k: f.get_tensor(k) for k in keys if k in present}


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def load_site(path: str | Path, site_name: str, module: nn.Module, rank: int, scale: float,
              dims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, d_in], B [d_out, rank]) float32 of the adapter at one site, zero-padded to `rank`, with B multiplied
    by (adapter's scaling / `scale`) so that scale * B A equals the adapter's own delta."""
    path = Path(path)
    if not is_projection(module):
        raise ZooError(f"site {site_name} is a whole block, but kind 'lora' adapts single projections; use "
                       "kind 'block_lora' (one expert per block), or projection sites such as mlp.down_proj")
    cfg = read_config(path)
    key_a, key_b = f"{PREFIX}{site_name}.lora_A.weight", f"{PREFIX}{site_name}.lora_B.weight"
    found = _adapter_tensors(path, [key_a, key_b])
    if len(found) < 2:
        targets = cfg.get("target_modules")
        raise ZooError(f"adapter {str(path)!r} has no LoRA for site {site_name} (its target_modules: {targets}, "
                       f"layers_to_transform: {cfg.get('layers_to_transform')}); choose sites and layers it covers, "
                       "or use an adapter trained on this site")
    a, b = found[key_a], found[key_b]  # [r, d_in], [d_out, r]
    r = a.shape[0] if a.dim() == 2 else -1
    if r < 1 or b.dim() != 2 or a.shape[1] != dims[0] or tuple(b.shape) != (dims[1], r) or r > rank:
        raise ZooError(f"adapter {str(path)!r} at {site_name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                       f"site of d_in={dims[0]}, d_out={dims[1]}, rank<={rank}; use an adapter of this base")
    ratio = scale_of(cfg, r, site_name) / scale
    a_pad, b_pad = torch.zeros(rank, dims[0]), torch.zeros(dims[1], rank)  # float32, whatever the adapter's dtype
    a_pad[:r], b_pad[:, :r] = a.float(), b.float() * ratio
    return a_pad, b_pad  # finiteness is checked on loading (checkpoints.load_checked)


def write_adapter(directory: str | Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *, rank: int,
                  alpha: float, base: str, fan_in_fan_out: bool) -> Path:
    """Atomically write a PEFT LoRA adapter: `factors` maps a module path (site name) to (A [r, d_in], B [d_out, r])."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(factors), lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out, base_model_name_or_path=base)
    tensors = {}
    for site, (a, b) in factors.items():
        tensors[f"{PREFIX}{site}.lora_A.weight"] = a.detach().cpu().contiguous()
        tensors[f"{PREFIX}{site}.lora_B.weight"] = b.detach().cpu().contiguous()
    with atomic_dir(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    return Path(directory)
