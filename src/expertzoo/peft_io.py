"""PEFT LoRA adapter folders (adapter_config.json + adapter_model.safetensors): read one site's A and B with
the adapter's own scaling folded in, and write a zoo's LoRA expert as an adapter `peft.PeftModel` loads."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .errors import ZooError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: base_model.model.<module path>.lora_A.weight
UNSUPPORTED = {  # adapter_config key -> (value that is fine, what to say)
    "use_dora": (False, "DoRA adapters (use_dora: true) rescale the base weight"),
    "bias": ("none", "adapters that train biases (bias != none)"),
    "lora_bias": (False, "adapters with a LoRA bias (lora_bias: true)"),
    "modules_to_save": (None, "adapters that train whole modules (modules_to_save)"),
    "target_parameters": (None, "adapters that target nn.Parameters (target_parameters)"),
    "trainable_token_indices": (None, "adapters that train token embeddings (trainable_token_indices)"),
}


def is_peft_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


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
    return cfg


def scale_of(cfg: dict[str, Any], rank: int, module: str | None = None) -> float:
    """PEFT's scaling of one module: lora_alpha / r, or lora_alpha / sqrt(r) with rslora (alpha_pattern honoured)."""
    from peft.utils.other import get_pattern_key

    alpha = float(cfg.get("lora_alpha", 8))
    patterns = cfg.get("alpha_pattern") or {}
    if module is not None and patterns:
        alpha = float(patterns.get(get_pattern_key(list(patterns), module), alpha))
    return alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def expert_options(path: str | Path) -> dict[str, Any]:
    """`rank` and `alpha` of a lora expert that holds this adapter: the largest rank it uses (smaller ones are
    zero-padded) and an alpha giving the adapter's default scaling at that rank."""
    cfg = read_config(path)
    r = int(cfg.get("r", 8))
    rank = max([r, *map(int, (cfg.get("rank_pattern") or {}).values())])
    return {"rank": rank, "alpha": scale_of(cfg, r) * rank}


def _adapter_tensors(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS
    if not file.is_file():
        bin_file = path / "adapter_model.bin"
        what = f"holds only the pickled {bin_file.name}" if bin_file.is_file() else f"has no {WEIGHTS}"
        raise ZooError(f"adapter {str(path)!r} {what}; save it with save_pretrained(safe_serialization=True)")
    try:
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            return {k: f.get_tensor(k) for k in keys if k in present}
    except (SafetensorError, OSError) as err:
        raise ZooError(f"{str(file)!r} is not a readable safetensors file ({err}); save the adapter again") from None


def is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def load_site(path: str | Path, site_name: str, module: nn.Module, rank: int, scale: float,
              dims: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [rank, d_in], B [d_out, rank]) of the adapter at one site, zero-padded to `rank`, with B multiplied by
    (adapter's scaling / `scale`) so that scale * B A equals the adapter's own delta."""
    path = Path(path)
    if not is_projection(module):
        raise ZooError(f"site {site_name} is a whole block, but a PEFT LoRA adapts single projections; use "
                       "projection sites such as mlp.down_proj, mlp.up_proj, attn.q_proj (or sites: [attn])")
    cfg = read_config(path)
    key_a, key_b = f"{PREFIX}{site_name}.lora_A.weight", f"{PREFIX}{site_name}.lora_B.weight"
    found = _adapter_tensors(path, [key_a, key_b])
    if len(found) < 2:
        targets = cfg.get("target_modules")
        raise ZooError(f"adapter {str(path)!r} has no LoRA for site {site_name} (its target_modules: {targets}, "
                       f"layers_to_transform: {cfg.get('layers_to_transform')}); choose sites and layers it covers, "
                       "or use an adapter trained on this site")
    a, b = found[key_a], found[key_b]  # [r, d_in], [d_out, r]
    r = a.shape[0]
    if a.shape[1] != dims[0] or b.shape[0] != dims[1] or r > rank:
        raise ZooError(f"adapter {str(path)!r} at {site_name}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                       f"site of d_in={dims[0]}, d_out={dims[1]}, rank<={rank}; use an adapter of this base")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ZooError(f"adapter {str(path)!r} at {site_name} holds NaN or Inf values")
    ratio = scale_of(cfg, r, site_name) / scale
    a_pad, b_pad = a.new_zeros(rank, dims[0]), b.new_zeros(dims[1], rank)
    a_pad[:r], b_pad[:, :r] = a, b * ratio
    return a_pad, b_pad


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
