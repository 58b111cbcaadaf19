"""Router initialisation without training: `hidden` init from each expert's prompts routes held-out text of those
prompts to it; cheap_embed, random, negative prompts and init_data give the rows they promise."""
from __future__ import annotations

import random

import pytest
import torch

import expertzoo as ez
from expertzoo.data import tokenize
from expertzoo.evaluation.evaluate import evaluate
from helpers import PAD, fresh

LETTERS, DIGITS = "qwertyuiop", "0123456789"


def texts(alphabet: str, n: int, seed: int) -> list[str]:
    """n lines of six random 'words' over an alphabet."""
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(3, 7))) for _ in range(6)) for _ in range(n)]


def prompt_zoo(mode: str, arch: str = "llama", **router) -> ez.Zoo:
    model, tok = fresh(arch)
    experts = [{"name": "letters", "kind": "lora", "rank": 2, "positive_prompts": texts(LETTERS, 8, 0)},
               {"name": "digits", "kind": "lora", "rank": 2, "positive_prompts": texts(DIGITS, 8, 1)}]
    return ez.build({"base": f"tiny:{arch}", "experts": experts,
                     "router": {"kind": "learned", "top_k": 1, "init": mode, **router}}, model=model, tokenizer=tok)


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_init_routes_held_out_text_to_its_expert(mode):
    zoo = prompt_zoo(mode)
    for name, alphabet, seed in (("letters", LETTERS, 5), ("digits", DIGITS, 6)):
        held_out = tokenize([{"text": t} for t in texts(alphabet, 4, seed)], zoo.tokenizer, 64)
        share = evaluate(zoo, held_out, pad_id=PAD, progress=False)["expert_share"]
        assert share[name] > 0.8, (mode, name, share)


def test_default_learned_router_does_not_route_by_domain():
    """Control: without init the rows are small random vectors, and routing ignores the domains."""
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": "letters", "kind": "lora"}, {"name": "digits", "kind": "lora"}],
                    "router": {"kind": "learned", "top_k": 1}}, model=model, tokenizer=tok)
    shares = [evaluate(zoo, tokenize([{"text": t} for t in texts(a, 4, 5)], tok, 64), pad_id=PAD, progress=False)
              ["expert_share"][n] for n, a in (("letters", LETTERS), ("digits", DIGITS))]
    assert min(shares) < 0.8


def test_cheap_embed_rows_are_the_prompts_mean_embedding_at_every_site():
    zoo = prompt_zoo("cheap_embed")
    table = zoo.model.get_input_embeddings().weight.detach()
    for row, alphabet, seed in ((0, LETTERS, 0), (1, DIGITS, 1)):
        ids = [i for t in texts(alphabet, 8, seed) for i in [zoo.tokenizer.bos_token_id, *zoo.tokenizer(t, add_special_tokens=False)["input_ids"]]]
        want = table[ids].mean(0)
        for router in zoo.routers():
            assert torch.allclose(router.weight[row], want / want.norm(), atol=1e-6)


def test_negative_prompts_and_init_data_give_the_rows_they_promise(tmp_path):
    neg = texts(DIGITS, 3, 9)
    model, tok = fresh()
    base_cfg = {"base": "tiny:llama", "router": {"kind": "learned", "init": "hidden_avg"}}
    with_neg = ez.build({**base_cfg, "experts": [
        {"name": "letters", "kind": "lora", "positive_prompts": texts(LETTERS, 8, 0), "negative_prompts": neg}]},
        model=model, tokenizer=tok)
    (tmp_path / "letters.txt").write_text("\n\n".join(texts(LETTERS, 8, 0)), encoding="utf-8")
    from_data = ez.build({**base_cfg, "router": {**base_cfg["router"], "init_data": str(tmp_path)},
                          "experts": [{"name": "letters", "kind": "lora", "negative_prompts": neg}]},
                         model=fresh()[0], tokenizer=tok)
    plain = ez.build({**base_cfg, "experts": [{"name": "letters", "kind": "lora", "positive_prompts": texts(LETTERS, 8, 0)}]},
                     model=fresh()[0], tokenizer=tok)
    for a, b, c in zip(with_neg.routers(), from_data.routers(), plain.routers()):
        assert torch.allclose(a.weight[0], b.weight[0], atol=1e-6)  # init_data files == the same prompts
        assert (a.weight[0] - c.weight[0]).abs().max() > 1e-2  # negatives move the row
        assert torch.allclose(a.weight[0].norm(), torch.tensor(1.0))


def test_random_init_is_unit_rows_fixed_by_the_seed():
    a, b = prompt_zoo("random"), prompt_zoo("random")
    for ra, rb in zip(a.routers(), b.routers()):
        assert torch.equal(ra.weight, rb.weight)
        assert torch.allclose(ra.weight[:2].norm(dim=-1), torch.ones(2))


def test_init_rows_survive_save_and_load(tmp_path):
    zoo = prompt_zoo("hidden")
    zoo.save(tmp_path / "z")
    again = ez.load(tmp_path / "z")
    assert again.zoo_config.experts[0].positive_prompts == texts(LETTERS, 8, 0)
    for a, b in zip(zoo.routers(), again.routers()):
        assert torch.equal(a.weight, b.weight)


def test_init_without_prompts_names_the_expert(tmp_path):
    model, tok = fresh()
    cfg = {"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "positive_prompts": ["x y"]},
                                             {"name": "b", "kind": "lora"}],
           "router": {"kind": "learned", "init": "hidden"}}
    with pytest.raises(ez.ZooError, match="expert 'b' has no positive_prompts"):
        ez.build(cfg, model=model, tokenizer=tok)
    cfg["router"]["init_data"] = str(tmp_path)
    with pytest.raises(ez.ZooError, match="has no a.txt or a.jsonl"):
        ez.build(cfg, model=fresh()[0], tokenizer=tok)
