"""The frozen prefix below a zoo's first site computed once (data/hidden.py, nn/prefix.py): evaluation and training
from cached hidden states equal the full forward; the disk cache is reused only for the same weights and tokens."""
from __future__ import annotations

import pytest
import torch

import expertzoo as ez
from expertzoo.data import Example
from expertzoo.data.hidden import prefix_cache
from expertzoo.evaluation.evaluate import evaluate
from expertzoo.nn import prefix as prefix_module
from expertzoo.nn.prefix import PREFIX_MODEL_TYPES
from expertzoo.training.train import train_expert
from helpers import PAD, assert_close, fresh, perturb, random_ids

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def upper_zoo(arch: str, kind: str = "lora"):
    """A zoo whose experts sit at layer 1 (of 2): layer 0 is the frozen prefix."""
    model, tok = fresh(arch)
    options = {"lora": {"rank": 4}, "mlp": {"hidden": 16}}.get(kind, {})
    zoo = ez.build({"base": f"tiny:{arch}", "sites": ["mlp"], "layers": [1],
                    "experts": [{"name": "a", "kind": kind, **options}, {"name": "b", "kind": "mlp", "hidden": 16}],
                    "router": {"kind": "learned", "top_k": 1}}, model=model, tokenizer=tok)
    perturb(zoo)
    return zoo


def examples(n: int = 6, seed: int = 3) -> list[Example]:
    """Examples of different lengths (padded batches)."""
    out = []
    for i in range(n):
        ids = random_ids(1, 5 + 3 * i, seed=seed + i)[0].tolist()
        out.append(Example(ids, ids))
    return out


def cache_of(zoo, data, **kw):
    return prefix_cache(zoo.model, [l.site.layer for l in zoo.layers], data, pad_id=PAD, progress=False, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_from_the_prefix_equals_the_full_forward(arch):
    zoo, data = upper_zoo(arch), examples()
    cache = cache_of(zoo, data)
    assert cache is not None and cache.layer == 1
    full = evaluate(zoo, data, pad_id=PAD, batch_size=4, progress=False)
    fast = evaluate(zoo, data, pad_id=PAD, batch_size=4, progress=False, prefix=cache)
    assert fast["tokens"] == full["tokens"]
    assert abs(fast["nll"] - full["nll"]) < 1e-6
    assert fast["expert_share"] == pytest.approx(full["expert_share"], abs=1e-9)


@pytest.mark.parametrize("kind", ["lora", "mlp", "ffn"])
def test_training_from_the_prefix_equals_training_in_full(kind):
    data = examples(8)
    runs = []
    for use_prefix in (False, True):
        zoo = upper_zoo("llama", kind)
        cache = cache_of(zoo, data) if use_prefix else None
        losses = train_expert(zoo, "a", data, steps=4, batch_size=2, lr=1e-2, progress=False, prefix=cache)
        runs.append((losses, torch.cat([p.detach().flatten() for p in zoo.expert_parameters("a")])))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-5)
    assert_close(runs[0][1], runs[1][1], atol=1e-5)


def test_the_layers_are_restored_after_running_from_the_prefix():
    zoo, data = upper_zoo("llama"), examples(2)
    layers_before = list(zoo.model.model.layers)
    cache = cache_of(zoo, data)
    with cache.running():
        assert isinstance(zoo.model.model.layers[0], prefix_module.PassThrough)
    assert list(zoo.model.model.layers) == layers_before


def test_no_prefix_where_nothing_can_be_skipped():
    model, tok = fresh("gpt2")  # adds position embeddings to inputs_embeds: not a prefix architecture
    zoo = ez.build({"base": "tiny:gpt2", "sites": ["mlp"], "layers": [1], "experts": [{"name": "a", "kind": "mlp"}]},
                   model=model, tokenizer=tok)
    assert "gpt2" not in PREFIX_MODEL_TYPES
    assert cache_of(zoo, examples(2)) is None
    assert cache_of(upper_zoo("llama"), examples(2)) is not None
    model, tok = fresh("llama")
    bottom = ez.build({"base": "tiny:llama", "sites": ["mlp"], "layers": [0, 1], "experts": [{"name": "a", "kind": "mlp"}]},
                      model=model, tokenizer=tok)
    assert cache_of(bottom, examples(2)) is None  # a site at layer 0: nothing below it


def test_disk_cache_is_reused_for_the_same_weights_and_tokens_only(tmp_path, monkeypatch):
    zoo, data = upper_zoo("llama"), examples(3)
    first = cache_of(zoo, data, folder=tmp_path)
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 1
    calls = []
    real = prefix_module.hidden_before
    monkeypatch.setattr("expertzoo.data.hidden.hidden_before", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = cache_of(zoo, data, folder=tmp_path)
    assert not calls, "the same weights and tokens must be read from the disk cache"
    assert all(torch.equal(a, b) for a, b in zip(first.hidden, again.hidden))
    with torch.no_grad():  # other weights below the first site: computed anew, stored beside
        zoo.model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    cache_of(zoo, data, folder=tmp_path)
    assert calls and len(list(tmp_path.glob("prefix-*.safetensors"))) == 2
    zoo.model.model.layers[1].mlp.base_layer.up_proj.weight.data.mul_(2.0)  # above the prefix: same key
    cache_of(zoo, data, folder=tmp_path)
    assert len(list(tmp_path.glob("prefix-*.safetensors"))) == 2


def test_an_example_outside_the_cache_is_refused():
    zoo, data = upper_zoo("llama"), examples(2)
    cache = cache_of(zoo, data)
    with pytest.raises(ez.ZooError, match="outside this prefix cache"):
        cache.batch(examples(1, seed=40))


def test_cli_train_expert_and_eval_equal_with_and_without_the_prefix_cache(tmp_path, monkeypatch):
    """`zoo train-expert` / `zoo eval` on a zoo whose sites start at layer 1 read the prefix from the cache folder
    by default; --no-prefix-cache runs every layer: same losses, same held-out NLL."""
    import json

    from expertzoo.cli import main

    monkeypatch.setenv("EXPERTZOO_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(f"document {i} " + "words and more words " * (i % 5 + 2) for i in range(30)))
    metrics = {}
    for flag in ([], ["--no-prefix-cache"]):
        out = tmp_path / f"expert{len(flag)}"
        assert main(["train-expert", "--base", "tiny:llama", "--kind", "lora", "--data", str(data), "--layers", "1",
                     "--steps", "6", "--batch-size", "2", "--max-len", "32", "--lr", "1e-2", "--option", "rank=4",
                     "-o", str(out), *flag]) == 0
        metrics[bool(flag)] = json.loads((out / "metrics.json").read_text())
    assert len(list((tmp_path / "cache" / "prefix").glob("prefix-*.safetensors"))) == 2  # train and held-out sets
    assert metrics[False]["losses"] == pytest.approx(metrics[True]["losses"], abs=1e-5)
    assert metrics[False]["nll"] == pytest.approx(metrics[True]["nll"], abs=1e-5)
    config = tmp_path / "zoo.yaml"
    config.write_text(json.dumps({"base": "tiny:llama", "sites": ["mlp"], "layers": [1],
                                  "experts": [{"name": "e", "kind": "lora", "rank": 4, "from": str(tmp_path / "expert0")}],
                                  "router": {"kind": "learned", "top_k": 1}}))
    assert main(["build", str(config), "-o", str(tmp_path / "zoo")]) == 0
    results = {}
    for flag in ([], ["--no-prefix-cache"]):
        assert main(["eval", str(tmp_path / "zoo"), "--data", f"d={data}", "--json", str(tmp_path / "r.json"), *flag]) == 0
        results[bool(flag)] = json.loads((tmp_path / "r.json").read_text())["datasets"]["d"]
    assert results[False]["nll"] == pytest.approx(results[True]["nll"], abs=1e-6)
    assert results[False]["tokens"] == results[True]["tokens"]
