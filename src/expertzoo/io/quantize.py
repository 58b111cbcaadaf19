"""Quantized bases (`quantize: int8 | int4` in a zoo config): the base's decoder projections to int8 weight-only
(CPU or GPU) or int4 weight-only (a CUDA GPU) with torchao; embeddings, norms, the LM head, experts and routers stay
in full precision."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ZooError

MODES = ("none", "int8", "int4")
SKIP = (".experts.", ".router", "lm_head")  # what the zoo adds, and the (often tied) output head


def _quantizable(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and type(module.weight.data) is torch.Tensor and \
        not any(s in f".{fqn}" for s in SKIP)


def quantize_base(model: nn.Module, mode: str) -> int:
    """Quantize the base's projections in place (zoo experts and routers are left alone, as are projections quantized
    already); returns how many were quantized."""
    if mode == "none":
        return 0
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ZooError(f"quantize: {mode} needs torchao; run `pip install 'expertzoo[quantize]'` "
                       "or set quantize: none") from None
    device = next(model.parameters()).device
    if mode == "int4" and device.type != "cuda":
        raise ZooError("quantize: int4 runs on a CUDA GPU only (torchao's int4 kernels); move the base to a GPU "
                       "or use quantize: int8 on a CPU")
    targets = [(n, m) for n, m in model.named_modules() if _quantizable(m, n)]
    config = Int8WeightOnlyConfig() if mode == "int8" else Int4WeightOnlyConfig(group_size=128)
    quantize_(model, config, filter_fn=_quantizable)
    return len(targets)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (quantized weights at their packed size)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _stored_bytes(t.data if isinstance(t, nn.Parameter) else t)
    return total


def _stored_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) is not torch.Tensor:  # a torchao tensor subclass: its packed parts
        names, _ = inner()
        return sum(_stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
