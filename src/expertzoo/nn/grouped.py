"""Grouped matmul, `expertzoo::grouped_mm`: rows of x sorted by expert, each group times its expert's weight, with
the group ends on the device. It is one opaque operator to `torch.compile` (its output shape [M,N] never depends on
the ends), so a dispatch through it makes no graph break: on a CUDA device, in bf16 with aligned shapes, it is
`torch._grouped_mm` (no host sync at all, as transformers' own MoE layers run); elsewhere one matmul per group after
reading the ends (a host sync inside the operator, free on a CPU)."""
from __future__ import annotations

import torch

__all__ = ["grouped_mm", "native", "native_shape"]


def native(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` takes x [M,K] and w [E,K,N]: a CUDA device and `native_shape`."""
    return x.is_cuda and x.dtype == w.dtype and native_shape(w.dtype, x.shape[1], w.shape[2])


def native_shape(dtype: torch.dtype, *widths: int) -> bool:
    """Whether `torch._grouped_mm` takes operands of `dtype` with these row widths: bf16, 16-byte multiples."""
    return dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm") and all(n % 8 == 0 for n in widths)


@torch.library.custom_op("expertzoo::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """x [M,K] (rows grouped by expert), w [E,K,N], ends [E] int32 (cumulative row ends, non-decreasing) -> [M,N]:
    rows ends[e-1]:ends[e] times w[e]; rows past ends[-1] are 0."""
    if native(x, w):
        try:
            out = torch._grouped_mm(x, w, offs=ends)
        except RuntimeError:  # a layout this build's kernel refuses: the loop below
            pass
        else:
            return out.masked_fill(torch.arange(x.shape[0], device=x.device)[:, None] >= ends[-1], 0.0)
    out = x.new_zeros(x.shape[0], w.shape[2])
    start = 0
    for e, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = x[start:end] @ w[e]
        start = end
    return out


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[2])
