"""`init: mergekit*`: router rows as mergekit-moe computes its gates (bfloat16 base, BOS-prefixed prompts left-padded
with BOS, the residual stream entering each layer); checked against transformers' hidden states here, and against
the mergekit package itself in tests marked `mergekit` (equal values)."""
from __future__ import annotations

import pytest
import torch

import expertzoo as ez
from helpers import fresh

PROMPTS = {"code": (["def f(x):\n    return x", "import os\nprint(os.getcwd())"], ["Bonjour, comment allez-vous ?"]),
           "math": (["What is 12 * 7?", "Solve 3x + 2 = 11 for x."], [])}
COSINE = 0.9999


def zoo_with(init: str, seed: int = 0) -> ez.Zoo:
    model, tok = fresh()
    experts = [{"name": n, "kind": "lora", "rank": 2, "positive_prompts": p, "negative_prompts": q}
               for n, (p, q) in PROMPTS.items()]
    return ez.build({"base": "tiny:llama", "sites": ["mlp"], "experts": experts, "seed": seed,
                     "router": {"kind": "learned", "top_k": 1, "init": init}}, model=model, tokenizer=tok)


def rows(zoo: ez.Zoo) -> torch.Tensor:  # [L, E, d]
    return torch.stack([r.weight.detach()[:len(zoo.expert_names)] for r in zoo.routers()])


def residual_stream_rows(texts: dict[str, tuple[list[str], list[str]]]) -> torch.Tensor:
    """[L, E, d]: unit(mean last-token state entering each layer, positives minus negatives), bf16 base."""
    model, tok = fresh()
    model = model.to(torch.bfloat16)
    tok.padding_side, tok.pad_token = "left", tok.bos_token

    def mean_state(items: list[str]) -> torch.Tensor:
        batch = tok([tok.bos_token + t for t in items], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            states = model(**batch, output_hidden_states=True).hidden_states[:-1]
        return torch.stack([s[:, -1].float().mean(0) for s in states])  # [L, d]

    out = []
    for pos, neg in texts.values():
        v = mean_state(pos) - (mean_state(neg) if neg else 0)
        out.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(out, dim=1)


def min_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).min().item()


def test_mergekit_rows_are_the_residual_stream_entering_each_layer():
    got = rows(zoo_with("mergekit"))
    assert min_row_cosine(got, residual_stream_rows(PROMPTS)) >= COSINE
    ours = rows(zoo_with("hidden"))  # the gate's own input (after the post-attention norm): other rows
    assert min_row_cosine(got, ours) < 0.99


def test_mergekit_random_draws_one_layers_by_experts_tensor_from_the_seed():
    got = rows(zoo_with("mergekit_random", seed=7))
    torch.manual_seed(7)
    assert torch.equal(got, torch.randn((2, 2, 64)))


def test_mergekit_cheap_embed_is_one_unit_row_per_expert_on_every_layer():
    got = rows(zoo_with("mergekit_cheap_embed"))
    assert torch.allclose(got[0], got[1]) and torch.allclose(got.norm(dim=-1), torch.ones(2, 2), atol=1e-5)


@pytest.mark.mergekit
@pytest.mark.parametrize("mode", ["hidden", "hidden_avg", "cheap_embed", "random"])
def test_rows_match_the_mergekit_package(mode, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.common import ModelReference
    from mergekit.moe.config import Expert
    from mergekit.moe.router import get_gate_params

    model, tok = fresh()
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    experts = [Expert(source_model=ModelReference.parse(str(tmp_path / "base")), positive_prompts=p,
                      negative_prompts=q or None) for p, q in PROMPTS.values()]
    torch.manual_seed(3)
    theirs = get_gate_params(ModelReference.parse(str(tmp_path / "base")), tok, experts, mode=mode, device="cpu")
    ours = rows(zoo_with("mergekit" if mode == "hidden" else f"mergekit_{mode}", seed=3))
    assert min_row_cosine(ours, theirs) >= COSINE
    assert torch.equal(ours, theirs.float())  # the very same values, not only close ones
