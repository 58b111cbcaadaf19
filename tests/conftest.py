"""Session fixtures (a fixed token batch, reference logits of untouched tiny bases) and the test tiers: every test
under tests/unit, tests/integration or tests/real carries that marker (`make test-fast` runs unit)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fresh, logits, random_ids

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "real")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


@pytest.fixture(scope="session")
def ids() -> torch.Tensor:
    """A fixed batch [2, 9] of byte ids."""
    return random_ids(2, 9, seed=1)


@pytest.fixture(scope="session")
def base_logits():
    """base_logits(arch, ids, mask=None): logits of an untouched tiny base (one shared model per arch)."""
    models: dict[str, torch.nn.Module] = {}

    def get(arch: str, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
        if arch not in models:
            models[arch] = fresh(arch)[0]
        return logits(models[arch], ids, mask, **kw)

    return get




@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from threads, and OpenMP threads competing with a busy machine slow every op down
    by orders of magnitude; tests marked `real` (the 135M model) keep the default."""
    if request.node.get_closest_marker("real"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
