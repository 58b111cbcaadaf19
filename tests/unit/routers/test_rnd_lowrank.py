"""The low-rank RND router: fitted from activations one expert at a time, it routes in-domain inputs (synthetic
clusters, and held-out sequences of a tiny zoo) to their expert, sends far-off inputs to the base, and its cost per
token follows its formula and stays within 3x the centroid router's at E=12, d=576."""
from __future__ import annotations

import pytest
import torch

from expertzoo import BASE, ROUTERS
from expertzoo.nn.routing import RouteInput
from expertzoo.training.fit import fit_router, with_router

D = 48


def router(kind: str, d: int, n: int, **options):
    return ROUTERS.get(kind)(d_in=d, experts=[f"e{i}" for i in range(n)], top_k=1, null_experts=0,
                             always_on_base=False, options=options).eval()


def clusters(n: int, d: int, per: int, seed: int, centres_seed: int = 0) -> list[torch.Tensor]:
    """`n` Gaussian clusters [per, d] around random centres (fixed by `centres_seed`), samples from `seed`."""
    centres = torch.randn(n, d, generator=torch.Generator().manual_seed(centres_seed)) * 3
    g = torch.Generator().manual_seed(seed)
    return [c + torch.randn(per, d, generator=g) for c in centres]


def test_routes_in_domain_inputs_to_their_expert():
    r = router("rnd_lowrank", D, 4, rank=8, steps=300)
    for i, x in enumerate(clusters(4, D, 400, seed=1)):
        r.fit(f"e{i}", x)
    assert bool(r.fitted.all())
    correct = to_base = 0
    for i, x in enumerate(clusters(4, D, 100, seed=2)):
        out = r(RouteInput(x, torch.ones(4, dtype=torch.bool)))
        correct += int((out.indices[:, 0] == i).sum())
        to_base += int((out.indices[:, 0] == BASE).sum())
    assert correct / (400 - to_base) >= 0.98  # the inputs given to an expert go to their own
    assert to_base / 400 <= 0.1  # the 99% fallback threshold, calibrated on 80 held-out inputs, keeps most


def test_fallback_threshold_is_calibrated_and_sends_far_inputs_to_the_base():
    r = router("rnd_lowrank", D, 2, rank=8, steps=300, fallback_quantile=0.95)
    for i, x in enumerate(clusters(2, D, 500, seed=1)):
        r.fit(f"e{i}", x)
    allowed = torch.ones(2, dtype=torch.bool)
    near = torch.cat(clusters(2, D, 200, seed=3))
    far = clusters(1, D, 200, seed=4, centres_seed=99)[0] * 4
    base_near = float((r(RouteInput(near, allowed)).indices[:, 0] == BASE).float().mean())
    base_far = float((r(RouteInput(far, allowed)).indices[:, 0] == BASE).float().mean())
    assert base_near <= 0.15  # about 5% of in-domain inputs exceed a 95% threshold
    assert base_far >= 0.9
    off = router("rnd_lowrank", D, 2, rank=8, steps=300, fallback=False)
    for i, x in enumerate(clusters(2, D, 500, seed=1)):
        off.fit(f"e{i}", x)
    assert not bool((off(RouteInput(far, allowed)).indices == BASE).any())


def test_fitting_one_expert_leaves_the_others_untouched():
    r = router("rnd_lowrank", D, 3, rank=8, steps=50)
    xs = clusters(3, D, 100, seed=1)
    r.fit("e0", xs[0])
    r.fit("e1", xs[1])
    before = r.pred_w1[0].clone(), r.threshold[0].clone()
    r.fit("e2", xs[2])
    assert torch.equal(r.pred_w1[0], before[0]) and torch.equal(r.threshold[0], before[1])


def test_cost_per_token_formula():
    r = router("rnd_lowrank", 576, 12)
    o = r.options
    expected = (2 * 576 * o.rank + 2 * (o.rank * o.target_hidden + o.target_hidden * o.out_dim)
                + 12 * 2 * (o.rank * o.predictor_hidden + o.predictor_hidden * o.out_dim) + 12 * 3 * o.out_dim
                + 3 * 576 + 3 * o.rank)
    assert r.flops_per_token() == expected
    r.add_expert("e12")
    assert r.flops_per_token() == expected + 2 * (o.rank * o.predictor_hidden + o.predictor_hidden * o.out_dim) \
        + 3 * o.out_dim


def test_at_most_three_times_the_centroid_cost_at_twelve_experts():
    cheap, centroid, rnd = router("rnd_lowrank", 576, 12), router("centroid", 576, 12), router("rnd", 576, 12)
    assert cheap.flops_per_token() <= 3 * centroid.flops_per_token()
    assert cheap.flops_per_token() < rnd.flops_per_token() / 5


@pytest.mark.parametrize("n", [12, 48])
def test_cost_grows_slower_than_e_times_d(n):
    """Each extra expert costs a small predictor on r inputs, far less than the d-wide work of centroid."""
    small, big = router("rnd_lowrank", 576, n), router("rnd_lowrank", 576, 2 * n)
    per_expert = (big.flops_per_token() - small.flops_per_token()) / n
    assert per_expert < 2 * 576


def test_fits_from_a_zoo_and_routes_held_out_sequences(tmp_path):
    """fit_router on a tiny zoo with two LoRA experts on disjoint alphabets routes held-out sequences right."""
    import expertzoo
    from expertzoo.data import tokenize
    from expertzoo.evaluation.evaluate import evaluate
    from helpers import PAD

    model, tok = expertzoo.load_base("tiny:llama")
    zoo = expertzoo.build({"base": "tiny:llama", "layers": [0], "router": {"kind": "uniform"},
                           "experts": [{"name": n, "kind": "lora", "rank": 4} for n in ("low", "dig")]},
                          model=model, tokenizer=tok)
    texts = {"low": "abcdefghij klmnop qrstu vwxyz", "dig": "0123 4567 89 + 12 - 34 = 56"}

    def docs(name: str, n: int, shift: int):
        s = texts[name]
        return tokenize([{"text": (s[(i + shift) % len(s):] + " " + s) * 2} for i in range(n)], tok)

    train = {n: docs(n, 24, 0) for n in texts}
    test = {n: docs(n, 8, 5) for n in texts}
    fitted = with_router(zoo, {"kind": "rnd_lowrank", "top_k": 1, "options": {"rank": 8, "steps": 200}})
    fit_router(fitted, train)
    for name, ex in test.items():
        assert evaluate(fitted, ex, pad_id=PAD, label=name, progress=False)["routing_accuracy"] >= 0.9
