"""Weight banks: same-shape experts' weights stacked for batched matmuls. Without autograd a bank is a view of one
buffer the experts' own parameters are re-pointed into (values, shapes and Parameter identity kept), so it is never
stale; `BankCache` keeps a kind's bank between calls and remakes it when a member's weights moved."""
from __future__ import annotations

from typing import Callable, Generic, Sequence, TypeVar

import torch

T = TypeVar("T")


class BankCache(Generic[T]):
    """One group's bank, made by `make()` once and again whenever any of `params` moved (checked by address);
    while autograd tracks the params, a fresh differentiable bank on every call."""

    def __init__(self) -> None:
        self._addresses: list[int] | None = None
        self._bank: T | None = None

    def get(self, params: Sequence[torch.Tensor], make: Callable[[], T]) -> T:
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return make()
        if torch.compiler.is_compiling():  # addresses cannot be read while tracing: the bank of the last eager call
            return make() if self._bank is None else self._bank
        if self._bank is None or self._addresses != [p.data_ptr() for p in params]:
            self._bank = make()
            self._addresses = [p.data_ptr() for p in params]  # after make(): it may re-point the params
        return self._bank


def shared_cat(params: Sequence[torch.Tensor], *, dim: int, transpose: bool = False,
               new_dim: bool = False) -> torch.Tensor:
    """torch.cat (torch.stack with `new_dim`) of 2-D `params` (each transposed first with `transpose`) along `dim`.

    While autograd tracks the params this is a differentiable copy. Otherwise it is a view: the params are moved
    once into one buffer (each `p.data` re-pointed to its slice; values, shapes and Parameter identity kept), and
    later calls find them adjacent and return the buffer without copying. Any in-place update of a param
    (optimizer, load_state_dict, `.data` writes) lands in the buffer, so the view is never stale.
    """
    if (torch.is_grad_enabled() and any(p.requires_grad for p in params)) or torch.compiler.is_compiling():
        return torch.cat([_part(p, transpose, new_dim, dim) for p in params], dim)  # a copy (traced: no re-pointing)
    joined = adjacent(params, dim, transpose, new_dim)
    if joined is None:
        joined = torch.cat([_part(p.detach(), transpose, new_dim, dim) for p in params], dim)  # one new buffer
        size = joined.shape[dim] // len(params)
        for i, p in enumerate(params):
            part = joined.narrow(dim, i * size, size)
            part = part.squeeze(dim) if new_dim else part
            p.data = part.T if transpose else part
    return joined


def _part(t: torch.Tensor, transpose: bool, new_dim: bool, dim: int) -> torch.Tensor:
    t = t.T if transpose else t
    return t.unsqueeze(dim) if new_dim else t


def adjacent(params: Sequence[torch.Tensor], dim: int, transpose: bool, new_dim: bool) -> torch.Tensor | None:
    """The concatenation as one contiguous view of the first param's storage, if the params already are its
    slices; else None. Reads only shapes, strides and addresses (no tensor is made unless they match)."""
    first = params[0]
    shape, stride = list(first.shape), list(first.stride())
    if transpose:
        shape, stride = shape[::-1], stride[::-1]
    if new_dim:
        shape.insert(dim, 1)
        stride.insert(dim, 0)
    part_shape = list(shape)
    shape[dim] *= len(params)
    want = [1] * len(shape)  # contiguous strides of the whole
    for d in range(len(shape) - 2, -1, -1):
        want[d] = want[d + 1] * shape[d + 1]
    if any(s != w for s, w, n in zip(stride, want, part_shape) if n > 1):
        return None
    size = first.element_size()
    step, ptr = part_shape[dim] * want[dim] * size, first.data_ptr()
    for i, p in enumerate(params):
        if (p.data_ptr() != ptr + i * step or p.shape != first.shape or p.stride() != first.stride()
                or p.dtype != first.dtype or p.device != first.device):
            return None
    if (first.storage_offset() + shape[0] * want[0]) * size > first.untyped_storage().nbytes():
        return None
    return first.detach().as_strided(shape, want, first.storage_offset())
