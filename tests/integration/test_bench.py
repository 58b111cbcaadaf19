"""The quick benchmark suite runs end to end and its key ratios hold with generous tolerances (the CPU is shared and
noisy: ratios only, never milliseconds). The full goals are in docs/results/bench-summary-*.md."""
from __future__ import annotations

import json

import pytest

from bench import __main__ as suite
from bench import common


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every quick benchmark, one thread, written to a temporary folder: {name: JSON document}."""
    out = tmp_path_factory.mktemp("bench")
    s = common.Settings(quick=True, device="cpu", threads=1, out=out)
    for module in suite.SUITE.values():
        module.run(s)
    suite.write_summary(s, {})
    return {p.stem.removeprefix("bench-").removesuffix("-cpu-quick"): json.loads(p.read_text())
            for p in out.glob("bench-*-cpu-quick.json")}


def rows(doc: dict, **match) -> list[dict]:
    found = [r for r in doc["rows"] if all(r.get(k) == v for k, v in match.items())]
    assert found, f"no rows with {match}"
    return found


def test_every_benchmark_wrote_json_markdown_and_machine(results):
    assert set(results) == {"layer", "e2e", "scaling", "overheads", "strategies", "compiled", "summary"}
    for name, doc in results.items():
        assert doc["machine"]["torch"] and doc["machine"]["nproc"] >= 1 and doc["machine"]["quick"] is True, name
    assert len(results["summary"]["goals"]) >= 8


def test_layer_fast_dispatch_and_transformers(results):
    """Outputs were checked equal before timing; the fast path is not slower than the plain one, and at 512
    tokens the FFN-expert layer is near the active-FLOP ideal and near transformers' block."""
    for r in rows(results["layer"], mode="forward"):
        assert r["max_abs_diff"] < 1e-3
        assert r["zoo_vs_reference"] < 1.5
    big = rows(results["layer"], tokens=512)[0]
    assert big["eta_zoo"] > 0.5
    assert big["zoo_vs_transformers"] < 1.5


def test_e2e_checks_and_speed(results):
    doc = results["e2e"]
    assert doc["checks"]["same_adapters"] < 1e-3 and doc["checks"]["zoo_arrow_vs_peft_arrow"] < 1e-3
    assert doc["checks"]["adapter_effect"] > 1e-2  # ... and the adapters do change the logits
    zoo = rows(doc, model="zoo")[0]
    assert zoo["prefill_vs_base"] > 0.4 and zoo["decode_vs_base"] > 0.3
    xlora = next(g for g in doc["goals"] if g["goal"].startswith("zoo decode faster than peft_xlora"))
    assert xlora["measured"] > 1.2  # X-LoRA decodes without KV cache and with a second pass


def test_many_lora_experts_cost_about_as_much_as_few(results):
    r = rows(results["scaling"], kind="lora", tokens=1, experts=64)[0]
    assert r["vs_4_experts"] < 2.0


def test_overheads(results):
    alone = rows(results["overheads"], what="routing+dispatch alone, ffn site")
    assert all(r["share_of_layer"] < 0.25 for r in alone)
    routers = [r for r in results["overheads"]["rows"] if r["what"].startswith("router ")]
    assert {r["what"].removeprefix("router ") for r in routers} >= {"learned", "uniform", "fixed"}
    nulls = [r for r in results["overheads"]["rows"] if r["what"].startswith("null")]
    assert nulls and all(r["efficiency"] > 0.1 for r in nulls)  # wall time saved by null slots; 0.29 seen on a loaded machine


def test_lora_strategy_choice_is_near_the_fastest(results):
    for r in results["strategies"]["rows"]:
        assert r["picked_vs_fastest"] < 3.0, r


def test_compiled_zoo_has_no_graph_break_and_equals_eager(results):
    """The compiled benchmark checked its contenders before timing them: the compiled zoo's logits and greedy tokens
    equal the eager zoo's; no token-choice router breaks the graph (expert choice does, by design)."""
    doc = results["compiled"]
    checks = doc["shapes"]["smollm2"]["checks"]
    assert checks["compiled_zoo_vs_eager"] < 1e-3 and checks["compiled_greedy_equal_tokens"] == 1
    breaks = {(b["router"], b["expert"]): b["breaks"] for b in doc["breaks"]}
    assert breaks[("base", "-")] == 0 and breaks[("learned", "ffn")] == 0
    assert all(n == 0 for (router, _), n in breaks.items() if router != "expert_choice")
    assert breaks[("expert_choice", "lora")] > 0
    zoo = rows(doc, model="zoo_compiled")[0]
    assert zoo["prefill_vs_base"] > 0.4 and zoo["decode_vs_base"] > 0.3
