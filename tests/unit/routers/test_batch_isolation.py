"""Batch isolation: for every router that claims batch invariance, an adversarial batch-mate crafted to hog
experts (long, one repeated token, plus many copies) leaves a victim sequence's logits unchanged."""
from __future__ import annotations

import pytest
import torch

from expertzoo import ROUTERS
from helpers import expert, logits, make_zoo, padded, perturb, random_ids, router


def _claims_invariance(kind: str) -> list[dict]:
    """Router configs of `kind` whose instances claim batch invariance (e.g. expert_choice only per sequence)."""
    cls = ROUTERS.get(kind)
    if "per_sequence" in cls.Options.model_fields:
        return [{"per_sequence": True}]
    return [{}] if cls.batch_invariant else []


CASES = [(kind, extra) for kind in ROUTERS.names() for extra in _claims_invariance(kind)]


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("kind, extra", CASES, ids=[k for k, _ in CASES])
def test_hogging_batch_mate_changes_nothing(kind, extra, granularity):
    names = ["a", "b", "c"]
    zoo = make_zoo(experts=[expert(n, "lora") for n in names],
                   router_cfg=router(kind, names, top_k=1, granularity=granularity, **extra))
    perturb(zoo, seed=1)
    assert getattr(zoo.routers()[0], "batch_invariant", True)
    victim = random_ids(1, 12, seed=5)[0]
    alone = logits(zoo, victim[None])
    hog = torch.full((40,), int(victim[0]))  # one token repeated: every slot of it goes to the same expert
    ids, mask = padded([victim, hog, hog, hog])
    batched = logits(zoo, ids, mask)[0, : len(victim)]
    assert torch.allclose(batched, alone[0], atol=1e-5), (batched - alone[0]).abs().max()
