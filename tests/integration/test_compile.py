"""The zoo forward compiles whole: `torch.compile(zoo.model, fullgraph=True)` traces every token-choice router and
every expert kind without a graph break (no host sync), and the compiled zoo equals the eager one."""
from __future__ import annotations

import pytest
import torch
import yaml

from expertzoo.cli import main
from expertzoo.errors import ZooError
from helpers import EXPERT_KINDS, PAD, ROUTER_KINDS, assert_close, padded, random_ids, takes
from test_matrix import ROUTING_MODES, matrix_zoo

# expert choice picks tokens per expert across the batch and reads its capacity on the host: it syncs, by design
TOKEN_CHOICE = [r for r in ROUTER_KINDS if r != "expert_choice"]


@pytest.fixture(scope="module")
def batch():
    """Two right-padded sequences of different lengths."""
    return padded([random_ids(1, 7, seed=1)[0], random_ids(1, 5, seed=2)[0]])


def compiled_logits(zoo, batch, backend: str) -> torch.Tensor:
    torch._dynamo.reset()
    model = torch.compile(zoo.model, fullgraph=True, backend=backend)  # fullgraph: a graph break raises
    ids, mask = batch
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def eager_logits(zoo, batch) -> torch.Tensor:
    ids, mask = batch
    with torch.no_grad():
        return zoo.model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("kind,mode", [("lora", "token"), ("ffn", "token"), ("lora", "sequence"), ("ffn", "global"),
                                       ("mlp", "sequence-global")])
def test_fullgraph_inductor_equals_eager(kind, mode, batch):
    """A learned top-2 zoo compiled by inductor in one graph equals eager (fp32); the other modes and routers are
    traced with the eager backend below (the same graph, no code generation)."""
    zoo = matrix_zoo(kind, "learned", "llama", **ROUTING_MODES[mode])
    eager = eager_logits(zoo, batch)
    assert_close(compiled_logits(zoo, batch, "inductor"), eager, atol=1e-5)


@pytest.mark.parametrize("router_kind", [r for r in TOKEN_CHOICE if takes(r, ["lora"])])
def test_every_token_choice_router_traces_in_one_graph(router_kind, batch):
    zoo = matrix_zoo("lora", router_kind, "llama")
    assert_close(compiled_logits(zoo, batch, "eager"), eager_logits(zoo, batch), atol=1e-5)


@pytest.mark.parametrize("expert_kind", [k for k in EXPERT_KINDS if k != "lora"])
def test_every_expert_kind_traces_in_one_graph(expert_kind, batch):
    zoo = matrix_zoo(expert_kind, "learned", "llama")
    assert_close(compiled_logits(zoo, batch, "eager"), eager_logits(zoo, batch), atol=1e-5)


@pytest.mark.parametrize("router_kind", ["centroid", "top_p"])
def test_sequence_granularity_and_global_scope_trace_in_one_graph(router_kind, batch):
    zoo = matrix_zoo("mlp", router_kind, "llama", granularity="sequence", scope="global")
    assert_close(compiled_logits(zoo, batch, "eager"), eager_logits(zoo, batch), atol=1e-5)


def test_explain_counts_no_graph_break(batch):
    """What `torch._dynamo.explain` says of a learned top-2 LoRA zoo: one graph, as for the base alone."""
    zoo = matrix_zoo("lora", "learned", "llama")
    ids, mask = batch
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(zoo.model)(input_ids=ids, attention_mask=mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_steering_follows_the_caller(batch):
    """A compiled zoo reads the steering set around its call (force_expert), as the eager zoo does."""
    zoo = matrix_zoo("lora", "learned", "llama")
    torch._dynamo.reset()
    model = torch.compile(zoo.model, fullgraph=True, backend="eager")
    ids, mask = batch
    with torch.no_grad():
        free = model(input_ids=ids, attention_mask=mask).logits
        with zoo.force_expert([]):
            forced = model(input_ids=ids, attention_mask=mask).logits
            assert_close(forced, zoo.model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    assert (free - forced).abs().max() > 1e-4  # the steering changed the compiled output


def greedy(zoo, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return zoo.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                            pad_token_id=PAD, **kw)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_compiled_generation_equals_eager_greedy(mode):
    """`generate(compile=True)`: a static cache, the decode steps compiled in one graph; sequence routing carries its
    running means from the eager prefill into the compiled steps (the carry read on the device)."""
    zoo = matrix_zoo("lora", "learned", "llama", **ROUTING_MODES[mode])
    ids = random_ids(1, 6, seed=3)
    torch._dynamo.reset()
    eager = greedy(zoo, ids)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(greedy(zoo, ids, compile=True), eager)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the decode steps really were compiled
    assert torch.equal(greedy(zoo, ids, compile=True), eager)  # the compiled steps reused


def test_compiled_generation_refuses_expert_choice():
    zoo = matrix_zoo("lora", "expert_choice", "llama")
    with pytest.raises(ZooError, match="expert_choice router reads its choices on the host"):
        greedy(zoo, random_ids(1, 4), compile=True)


def test_cli_generate_compile_prints_the_eager_text(tmp_path, capsys):
    config = tmp_path / "zoo.yaml"
    config.write_text(yaml.safe_dump({"base": "tiny:llama", "sites": ["mlp"], "layers": "all",
                                      "experts": [{"name": "code", "kind": "lora", "rank": 4}],
                                      "router": {"kind": "learned", "top_k": 1}}))
    assert main(["build", str(config), "-o", str(tmp_path / "zoo")]) == 0
    argv = ["generate", str(tmp_path / "zoo"), "--prompt", "hello", "--max-new-tokens", "5"]
    capsys.readouterr()
    assert main(argv) == 0
    eager = capsys.readouterr().out
    torch._dynamo.reset()
    assert main([*argv, "--compile"]) == 0
    assert capsys.readouterr().out == eager
