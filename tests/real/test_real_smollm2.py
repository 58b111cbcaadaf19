"""The real embedded base, SmolLM2-135M (marked `real`; make test runs it): load, build, generate, demo."""
from __future__ import annotations

import time

import pytest
import torch

import expertzoo as ez
from expertzoo.demo import DEMO_CONFIG, run_demo

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def base():
    ez.load_base("smollm2-135m")  # the first use converts the GGUF; later loads read the cache
    start = time.perf_counter()
    model, tok = ez.load_base("smollm2-135m")
    return model, tok, time.perf_counter() - start


def test_cached_load_is_quick_and_answers(base):
    model, tok, seconds = base
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert seconds < 10.0, f"cached load took {seconds:.1f} s"  # the goal is < 3 s; CI machines are noisy
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])


def test_build_generate_five_tokens(base):
    model, tok, _ = base
    ids = tok("def add(a, b):\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model(ids).logits
    zoo = ez.build(DEMO_CONFIG, model=model, tokenizer=tok)
    with torch.no_grad():
        assert torch.allclose(zoo(input_ids=ids).logits, ref, atol=1e-4)  # fresh experts change nothing
        out = zoo.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 5)


def test_demo_runs_end_to_end(tmp_path):
    report = run_demo(expert_steps=1, router_steps=1, eval_examples=2, out=tmp_path / "demo")
    assert set(report["results"]) == {"code", "math"}
    for r in report["results"].values():
        assert r["base"]["tokens"] == r["zoo"]["tokens"] > 0
    assert ez.load(tmp_path / "demo").expert_names == ["code", "math"]
