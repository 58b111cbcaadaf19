"""Routing state belongs to each call: threads generating at once through one zoo, each with its own steering,
trace and aux losses, get exactly what they get alone; nested force_expert blocks restore the outer block."""
from __future__ import annotations

import threading

import pytest
import torch

from helpers import PAD, expert, logits, make_zoo, perturb, random_ids, router

NAMES = ["a", "b", "c"]
MODES = {"token": {}, "sequence": {"granularity": "sequence"}, "global": {"scope": "global"},
         "sequence-global": {"granularity": "sequence", "scope": "global"}}
THREADS, ROUNDS = 4, 3


def zoo_of(mode: str):
    """Three perturbed experts of different kinds, learned top-1 routing in `mode`."""
    zoo = make_zoo(experts=[expert("a", "lora"), expert("b", "mlp"), expert("c", "ffn")],
                   router_cfg=router("learned", NAMES, top_k=1, **MODES[mode]))
    perturb(zoo, router_scale=3.0)
    return zoo


def greedy(zoo, ids: torch.Tensor) -> torch.Tensor:
    return zoo.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                        pad_token_id=PAD)


def in_threads(work) -> list[list]:
    """work(i) run ROUNDS times by each of THREADS threads started together: results[i][round]."""
    results: list[list] = [[] for _ in range(THREADS)]
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(ROUNDS):
                results[i].append(work(i))
        except BaseException as err:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("mode", list(MODES))
def test_threads_generate_what_they_generate_alone(mode):
    zoo = zoo_of(mode)
    prompts = [random_ids(1, 3 + 2 * i, seed=i) for i in range(THREADS)]
    with torch.no_grad():
        alone = [greedy(zoo, p) for p in prompts]
        together = in_threads(lambda i: greedy(zoo, prompts[i]))
    differ = sum(not torch.equal(out, alone[i]) for i in range(THREADS) for out in together[i])
    assert differ == 0, f"{differ} of {THREADS * ROUNDS} concurrent generations differ from the sequential ones"


def test_threads_keep_their_own_steering_and_trace():
    """Thread i forces its own expert (the last one: the base alone) and traces: both stay its own."""
    zoo = zoo_of("sequence")
    steering = [["a"], ["b"], ["c"], []]
    prompt = random_ids(1, 6, seed=7)

    def steered(i: int) -> tuple[torch.Tensor, int]:
        with torch.no_grad(), zoo.force_expert(steering[i]), zoo.trace() as trace:
            out = greedy(zoo, prompt)
        return out, len(trace.records)

    alone = [steered(i) for i in range(THREADS)]
    assert len({tuple(out[0].tolist()) for out, _ in alone}) > 1  # the steering changes the text
    together = in_threads(steered)
    for i in range(THREADS):
        for out, n_records in together[i]:
            assert torch.equal(out, alone[i][0]) and n_records == alone[i][1]
    assert zoo.ctx.forced is None and zoo.ctx.trace is None


def test_threads_see_their_own_aux_losses():
    zoo = zoo_of("token").train()
    batches = [random_ids(2, 5 + i, seed=10 + i) for i in range(THREADS)]

    def losses(i: int) -> dict[str, float]:
        with torch.no_grad():
            zoo(input_ids=batches[i])
        return {k: float(v) for k, v in zoo.aux_losses().items()}

    alone = [losses(i) for i in range(THREADS)]
    assert alone[0] and alone[0] != alone[1]
    together = in_threads(losses)
    assert all(got == alone[i] for i in range(THREADS) for got in together[i])


def test_disabling_in_one_thread_leaves_the_others_alone():
    zoo = zoo_of("token")
    ids = random_ids(2, 9, seed=3)
    routed = logits(zoo, ids)

    def disabled_then_routed(i: int) -> torch.Tensor:
        if i == 0:
            zoo.disable_expert("a")
        return logits(zoo, ids)

    together = in_threads(disabled_then_routed)
    assert not torch.equal(together[0][0], routed)
    assert all(torch.equal(out, routed) for i in range(1, THREADS) for out in together[i])
    assert zoo.ctx.disabled == frozenset()


def test_nested_force_expert_restores_the_outer_block():
    zoo = zoo_of("token")
    ids = random_ids(2, 7, seed=5)
    alone = {}
    for names in (["a"], ["b", "c"], []):
        with zoo.force_expert(names):
            alone[tuple(names)] = logits(zoo, ids)
    routed = logits(zoo, ids)
    with zoo.force_expert("a"):
        assert torch.equal(logits(zoo, ids), alone[("a",)])
        with zoo.force_expert(["b", "c"]):
            assert torch.equal(logits(zoo, ids), alone[("b", "c")])
            with zoo.force_expert([]):
                assert torch.equal(logits(zoo, ids), alone[()])
            assert torch.equal(logits(zoo, ids), alone[("b", "c")])
        assert torch.equal(logits(zoo, ids), alone[("a",)])
    assert torch.equal(logits(zoo, ids), routed) and zoo.ctx.forced is None
