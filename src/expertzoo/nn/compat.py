"""What differs between the transformers releases expertzoo supports: the keyword and output field that carry a
forward's KV cache (`cache` from transformers 5.24 on, `past_key_values` before), how long that cache is, and how
`generate` is told to compile its decode steps."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn
import transformers
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from ..errors import ZooError

CACHE_KEYWORDS = ("cache", "past_key_values")  # newest first


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model`'s forward takes its KV cache (a wrapper's, such as a zoo's: its `model`'s)."""
    if not isinstance(model, PreTrainedModel):
        model = getattr(model, "model", model)
    params = inspect.signature(model.forward).parameters
    return next((k for k in CACHE_KEYWORDS if k in params), CACHE_KEYWORDS[-1])


def output_cache(output: Any) -> Any:
    """The KV cache a model output carries (None without one), whichever field name it uses."""
    return next((output[k] for k in CACHE_KEYWORDS if output.get(k) is not None), None)


def past_length(kwargs: dict[str, Any], seq: int) -> int | torch.Tensor:
    """Tokens already in the KV cache when a forward of `seq` new tokens begins, read from the forward's keywords:
    the cache itself (`cache`, then `past_key_values`), else `cache_position`, else what an attention mask longer
    than the new tokens or the position ids imply (exact without left padding); 0 for a forward without a cache."""
    for key in CACHE_KEYWORDS:
        cache = kwargs.get(key)
        if cache is None:
            continue
        if hasattr(cache, "get_seq_length"):
            return _count(cache.get_seq_length())
        if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
            return int(cache[0][0].shape[-2])  # legacy ((key [B,H,S,D], value), ...) per layer
        raise ZooError(f"cannot read the length of the KV cache passed as `{key}` ({type(cache).__name__}) with "
                       f"transformers {transformers.__version__}; use a transformers release in expertzoo's range")
    unknown = [k for k, v in kwargs.items() if isinstance(v, Cache) and k not in CACHE_KEYWORDS]
    if unknown:
        raise ZooError(f"the forward got its KV cache as `{unknown[0]}`, a keyword expertzoo does not read "
                       f"(transformers {transformers.__version__}); use a transformers release in expertzoo's range")
    position = kwargs.get("cache_position")
    if position is not None and position.numel():
        return _count(position.reshape(-1)[0])
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() == 2 and mask.shape[1] > seq:
        return mask.shape[1] - seq
    ids = kwargs.get("position_ids")
    if ids is not None and ids.numel():
        return _count(ids.reshape(-1, ids.shape[-1])[:, 0].min())
    return 0


def _count(n: int | torch.Tensor) -> int | torch.Tensor:
    """A token count as an int; left a 0-dim tensor inside a compiled forward (reading it would sync the host)."""
    if isinstance(n, torch.Tensor) and torch.compiler.is_compiling():
        return n
    return int(n)


def compiled_generation(device: torch.device, cuda_graphs: bool = True) -> dict[str, Any]:
    """The `generate` keywords that run its decode steps through `torch.compile(fullgraph=True)` with a static KV
    cache (CUDA graphs on a GPU unless `cuda_graphs` is False; transformers compiles on a CPU only when asked to)."""
    from transformers import CompileConfig

    config = CompileConfig(fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda_graphs else "default")
    if torch.device(device).type not in ("cuda", "xpu"):
        config._compile_all_devices = True  # transformers' own switch for compiling elsewhere
    return {"cache_implementation": "static", "compile_config": config}
