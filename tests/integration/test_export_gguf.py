"""`zoo export --format gguf`: a Mixtral-exportable zoo (and a zoo with no experts, the dense base) as one GGUF file;
read back with the gguf package here, and run by llama.cpp (llama-cpp-python, marked `gguf`) with the zoo's
greedy tokens and logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import expertzoo as ez
from expertzoo.cli import main
from expertzoo.export import export
from expertzoo.export.gguf import GGUF_FILE
from helpers import fresh, logits, perturb

LLAMA_CPP_LOGIT_TOLERANCE = 1e-3  # float32 weights; llama.cpp sums in another order


def moe_zoo(n: int = 3, **config) -> ez.Zoo:
    model, tok = fresh("llama")
    zoo = ez.build({"base": "tiny:llama", "experts": [{"name": f"e{i}", "kind": "ffn"} for i in range(n)],
                    "router": {"kind": "learned", "top_k": 2}, **config}, model=model, tokenizer=tok)
    perturb(zoo, seed=3)
    return zoo


def dense_zoo() -> ez.Zoo:
    model, tok = fresh("llama")
    return ez.build({"base": "tiny:llama", "experts": []}, model=model, tokenizer=tok)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    zoos = {"moe": moe_zoo(), "dense": dense_zoo()}
    for name, zoo in zoos.items():
        export(zoo, root / name, "gguf")
    return zoos, root


def test_gguf_holds_the_experts_gates_and_config(exported):
    from gguf import GGUFReader

    zoos, root = exported
    reader = GGUFReader(root / "moe" / GGUF_FILE)
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.expert_count"].contents() == 3 and fields["llama.expert_used_count"].contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    zoo = zoos["moe"]
    layer = zoo.layers[1]
    gate_exps = np.asarray(tensors["blk.1.ffn_gate_exps.weight"].data)  # [E, d_ff, d]
    assert gate_exps.shape == (3, 128, 64)
    assert np.array_equal(gate_exps[2], layer.experts["e2"].module.gate_proj.weight.detach().numpy())
    assert np.array_equal(np.asarray(tensors["blk.1.ffn_gate_inp.weight"].data), layer.router.weight.detach()[:3].numpy())
    dense = {t.name for t in GGUFReader(root / "dense" / GGUF_FILE).tensors}
    assert "blk.0.ffn_gate.weight" in dense and not any("exps" in n for n in dense)


def test_what_gguf_cannot_hold_is_named(tmp_path, capsys):
    model, tok = fresh("qwen3")
    zoo = ez.build({"base": "tiny:qwen3", "experts": []}, model=model, tokenizer=tok)
    with pytest.raises(ez.ZooError, match="cannot export a qwen3 base as gguf.*--format zoo"):
        export(zoo, tmp_path / "q", "gguf")
    lora = ez.build({"base": "tiny:llama", "experts": [{"name": "a", "kind": "lora", "rank": 2}]},
                    model=fresh("llama")[0], tokenizer=tok)
    lora.save(tmp_path / "lora-zoo")
    assert main(["export", str(tmp_path / "lora-zoo"), "--format", "gguf", "-o", str(tmp_path / "out")]) == 2
    assert "lora" in capsys.readouterr().err


@pytest.mark.gguf
@pytest.mark.parametrize("name", ["moe", "dense"])
def test_llama_cpp_runs_the_export_with_the_zoos_tokens_and_logits(exported, ids, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    zoos, root = exported
    zoo, prompt = zoos[name], ids[0].tolist()
    llm = llama_cpp.Llama(model_path=str(root / name / GGUF_FILE), n_ctx=64, logits_all=True, verbose=False, n_threads=1)
    llm.eval(prompt)
    got = torch.tensor(np.asarray(llm.scores[:len(prompt)]))
    want = logits(zoo, ids[:1])[0]
    diff = (got - want).abs().max().item()
    assert diff < LLAMA_CPP_LOGIT_TOLERANCE, f"llama.cpp logits differ from the zoo's by {diff:.2e}"
    with torch.no_grad():
        greedy = zoo.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=8, do_sample=False,
                              min_new_tokens=8)[0, len(prompt):].tolist()
    llm.reset()
    theirs = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):  # default 1.1: not greedy
        theirs.append(token)
        if len(theirs) == 8:
            break
    assert theirs == greedy
