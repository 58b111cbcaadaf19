"""Weight banks (nn/banks.py): stacked weights as views of one buffer the experts' parameters are re-pointed into,
differentiable copies while training, and the cache that remakes a bank when a member's weights moved."""
from __future__ import annotations

import torch

from expertzoo.nn.banks import BankCache, shared_cat


def params(n: int = 3) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(n)]


def test_shared_cat_is_a_differentiable_copy_while_training():
    p = params(2)
    out = shared_cat(p, dim=0, new_dim=True)  # [2,3,4]
    out.sum().backward()
    assert out.shape == (2, 3, 4) and all(torch.equal(q.grad, torch.ones(3, 4)) for q in p)
    with torch.no_grad():
        view = shared_cat(p, dim=1, transpose=True)  # [4, 6]: p[0].T | p[1].T
        again = shared_cat(p, dim=1, transpose=True)
    assert view.data_ptr() == again.data_ptr() and torch.equal(view, torch.cat([q.T for q in p], 1))


def test_a_bank_view_sees_every_later_write_and_keeps_the_parameters():
    p = params()
    values = [q.detach().clone() for q in p]
    with torch.no_grad():
        bank = shared_cat(p, dim=0, new_dim=True)  # [3,3,4], one buffer
        assert all(torch.equal(bank[i], v) for i, v in enumerate(values))
        p[1].mul_(2.0)
        p[2].data.add_(1.0)
    assert torch.equal(bank[1], values[1] * 2) and torch.equal(bank[2], values[2] + 1)
    assert all(isinstance(q, torch.nn.Parameter) and q.shape == (3, 4) for q in p)


def test_cache_makes_once_and_again_when_a_weight_moves():
    p, made = params(), []

    def make() -> torch.Tensor:
        made.append(1)
        return shared_cat(p, dim=0, new_dim=True)

    cache: BankCache[torch.Tensor] = BankCache()
    with torch.no_grad():
        first = cache.get(p, make)
        assert cache.get(p, make) is first and len(made) == 1
        p[0].data = torch.randn(3, 4)  # re-pointed elsewhere
        second = cache.get(p, make)
    assert len(made) == 2 and torch.equal(second[0], p[0].detach())


def test_cache_gives_a_fresh_differentiable_bank_while_training():
    p = params(2)
    cache: BankCache[torch.Tensor] = BankCache()
    make = lambda: shared_cat(p, dim=0, new_dim=True)  # noqa: E731
    a, b = cache.get(p, make), cache.get(p, make)
    assert a is not b and a.requires_grad
    a.sum().backward()
    assert all(torch.equal(q.grad, torch.ones(3, 4)) for q in p)
