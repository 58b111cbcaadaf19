"""The zoo study's pipeline end to end on its smoke profile (tiny model, three stdlib/GSM8K domains, few steps):
every step runs and is cached, a rerun computes nothing, the report holds the promised JSON keys with intervals,
and --report-only explains what to do when nothing is cached yet."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
import study_report  # noqa: E402
import zoo_study  # noqa: E402


def test_plateau_rule():
    assert not zoo_study.plateau([(0, 5.0), (10, 4.0)], min_steps=20)
    assert zoo_study.plateau([(0, 5.0), (80, 3.01), (100, 3.0)], min_steps=20)
    assert not zoo_study.plateau([(0, 5.0), (80, 3.5), (100, 3.0)], min_steps=20)


def test_paired_bootstrap_recovery():
    base = {"window_nll": [10.0, 12.0, 8.0, 11.0], "window_tokens": [5, 5, 5, 5]}
    oracle = {"window_nll": [8.0, 10.0, 6.0, 9.0], "window_tokens": [5, 5, 5, 5]}
    half = {"window_nll": [9.0, 11.0, 7.0, 10.0], "window_tokens": [5, 5, 5, 5]}
    r = study_report.recovery(base, oracle, half)
    assert r["value"] == pytest.approx(0.5) and r["ci95"][0] == pytest.approx(0.5) and r["ci95"][1] == pytest.approx(0.5)
    worse = study_report.ratio(base, {"window_nll": [11.0, 12.0, 8.0, 11.0], "window_tokens": [5, 5, 5, 5]})
    assert worse["value"] == pytest.approx(42 / 41) and worse["ci95"][0] >= 1.0


def test_report_only_without_cache_says_what_to_run(tmp_path, capsys):
    with pytest.raises(SystemExit, match="nothing cached yet"):
        zoo_study.main(["--smoke", "--report-only", "--cache", str(tmp_path)])


@pytest.mark.real
def test_smoke_study_runs_end_to_end_and_resumes(tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    zoo_study.main(["--smoke", "--cache", str(cache), "--out", str(out), "--threads", "1"])
    doc = json.loads((out / "zoo-study-smoke.json").read_text())
    assert {"domains", "routers", "goals"} <= set(doc)
    assert doc["domains"] == ["stdlib-json", "stdlib-email", "math"]
    for router in ("centroid", "rnd", "rnd_lowrank", "phatgoose", "learned", "co-llm", "multitask", "merge:ties"):
        for d in doc["domains"]:
            cell = doc["routers"][router]["gain_recovery"][d]
            assert cell["ci95"][0] <= cell["value"] <= cell["ci95"][1] or cell["value"] != cell["value"]
        assert set(doc["routers"][router]["regression"]) == {"stdlib-textwrap", "stdlib-html"}
    assert all({"goal", "measured", "met"} <= set(g) for g in doc["goals"].values()) and "rnd_cost_3x" in doc["goals"]
    measured = json.loads((cache / "smoke" / "measured.json").read_text())
    capsys.readouterr()
    zoo_study.main(["--smoke", "--cache", str(cache), "--out", str(out), "--threads", "1"])
    assert "ETA" not in capsys.readouterr().out  # every step read back, none computed again
    assert json.loads((cache / "smoke" / "measured.json").read_text()).keys() == measured.keys()
    zoo_study.main(["--smoke", "--report-only", "--cache", str(cache), "--out", str(out)])
    assert (out / "zoo-study-smoke.md").read_text().startswith("# The zoo study")


def test_kept_files_go_back_into_an_empty_cache(tmp_path):
    """The repository keeps the cache's small files (measured steps, small experts) and restores them on a new machine;
    a file over the limit stays in the cache only."""
    cache, kept = tmp_path / "cache", tmp_path / "kept"
    (cache / "experts" / "code-lora").mkdir(parents=True)
    (cache / "measured.json").write_text('{"expert/code/lora": {"value": 1, "seconds": 2}}')
    (cache / "experts" / "code-lora" / "expert.safetensors").write_bytes(b"x" * 100)
    (cache / "experts" / "code-ffn").mkdir()
    (cache / "experts" / "code-ffn" / "expert.safetensors").write_bytes(b"x" * (zoo_study.Kept.LIMIT + 1))
    (cache / "prefix").mkdir()
    (cache / "prefix" / "p.safetensors").write_bytes(b"p")
    zoo_study.Kept(cache, kept).save()
    assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*") if p.is_file()) == [
        "experts/code-lora/expert.safetensors", "measured.json"]
    fresh = tmp_path / "fresh"
    assert zoo_study.Kept(fresh, kept).restore() == 2
    assert (fresh / "experts" / "code-lora" / "expert.safetensors").read_bytes() == b"x" * 100
    assert zoo_study.Kept(fresh, kept).restore() == 0  # nothing the cache lacks


def test_an_expert_is_trained_again_only_where_an_unmeasured_step_loads_it(tmp_path):
    """On a new machine the large experts are not in the cache; one whose every user is measured stays measured."""
    (tmp_path / "measured.json").write_text(json.dumps({k: {"value": {}, "seconds": 1} for k in (
        "expert/code/ffn", "eval/kind/code/ffn", "expert/math/ffn", "expert/math/lora", "expert/multitask")}))
    steps = zoo_study.Steps(tmp_path / "measured.json", ["expert/code/ffn", "eval/kind/code/ffn", "expert/math/ffn",
                                                         "eval/kind/math/ffn", "expert/math/lora", "expert/multitask",
                                                         "eval/multitask"])
    users = {"expert/code/ffn": ["eval/kind/code/ffn"], "expert/math/ffn": ["eval/kind/math/ffn"],
             "expert/math/lora": ["eval/kind/math/ffn"], "expert/multitask": ["eval/multitask"]}
    assert zoo_study.to_retrain(steps, users, on_disk={"expert/math/lora"}) == ["expert/math/ffn", "expert/multitask"]
    assert zoo_study.to_retrain(steps, users, on_disk={"expert/math/lora", "expert/math/ffn", "expert/multitask"}) == []


def _row(recovery: float, regression: float, gain: float, domains: list[str], routing_flops: int | None = None):
    row = {"gain_recovery": {n: {"value": recovery, "ci95": [recovery - 0.01, recovery + 0.01]} for n in domains},
           "regression": {"english": {"value": regression, "ci95": [regression, regression]}},
           "gain_nats": {n: gain for n in domains}, "english_base_alone": {"english": 0.0}}
    if routing_flops is not None:
        row["cost"] = {"router_flops_per_token_per_site": routing_flops, "in_lora_experts": 1.0, "fit_s": 1.0}
    return row


def test_goals_count_only_routers_that_are_not_told_the_domain():
    """Co-LLM pairs the base with the domain's own expert, uniform does not route and the multitask LoRA is a
    baseline: none of them may meet a router's goal, however well they do."""
    d = [f"d{i}" for i in range(12)]
    s = {"domains": d, "english_sets": ["english"], "lora_flops_per_token_per_site": 100,
         "oracle_gain_nats": {n: 0.3 for n in d}, "scaling": {}, "kinds": {},
         "routers": {"centroid": _row(0.6, 1.0, 0.18, d, 50), "uniform": _row(0.3, 0.99, 0.09, d, 0),
                     "merge:linear": _row(0.3, 0.99, 0.09, d), "multitask": _row(1.2, 1.09, 0.36, d),
                     "co-llm": _row(1.0, 1.001, 0.3, d)}}
    s["routers"]["co-llm"]["regression"]["english"]["worst"] = 1.002  # a mean over the domains' pairs
    raw = {"routers": {"centroid": {"fit_s": 1}, "uniform": {"fit_s": 0}}}
    g = study_report.goals(s, raw)
    assert g["best_router_95"]["measured"].startswith("centroid") and not g["best_router_95"]["met"]
    assert g["zoo_beats_baselines"]["measured"].startswith("mean gain (nats): centroid")
    assert not g["zoo_beats_baselines"]["met"] and not g["cheap_router_90"]["met"]
    text = "\n".join(study_report.reading(s, raw))
    assert "best by worst domain is centroid (60% worst" in text and "agree to 0.0e+00 nats" in text
    assert "multitask LoRA gains more than the oracle on 12 of 12 domains" in text


def test_best_router_goal_is_met_by_any_router_that_meets_both_conditions():
    """A router that recovers more but harms English must not hide one that meets the goal."""
    d = [f"d{i}" for i in range(12)]
    s = {"domains": d, "english_sets": ["english"], "lora_flops_per_token_per_site": 100,
         "oracle_gain_nats": {n: 0.3 for n in d}, "scaling": {}, "kinds": {},
         "routers": {"greedy": _row(0.99, 1.02, 0.3, d, 50), "careful": _row(0.96, 1.001, 0.29, d, 50)}}
    g = study_report.goals(s, {"routers": {"greedy": {"fit_s": 1}, "careful": {"fit_s": 1}}})
    assert g["best_router_95"]["met"] and g["best_router_95"]["measured"].startswith("careful")
    s["routers"]["careful"] = _row(0.94, 1.001, 0.29, d, 50)
    assert not study_report.goals(s, {"routers": {"greedy": {"fit_s": 1}, "careful": {"fit_s": 1}}})["best_router_95"]["met"]


def test_gain_difference_is_paired_per_domain():
    """Contender a beats b by exactly 0.1 nats a token on every window: the mean difference and its whole interval
    are 0.1, whatever windows the bootstrap draws."""
    w = {"window_tokens": [10, 10, 10]}
    b = {"d1": {**w, "window_nll": [20.0, 30.0, 25.0]}, "d2": {**w, "window_nll": [10.0, 40.0, 15.0]}}
    a = {n: {**w, "window_nll": [x - 1.0 for x in v["window_nll"]]} for n, v in b.items()}
    raw = {"routers": {"zoo": {"sets": a}}, "merges": {}, "multitask_eval": b}
    d = study_report.gain_difference(raw, "zoo", "multitask", ["d1", "d2"])
    assert d["value"] == pytest.approx(0.1) and d["ci95"] == pytest.approx([0.1, 0.1])
    a["d2"]["window_nll"] = [9.0, 45.0, 14.0]  # worse on one window of d2: the interval widens below and above 0
    d = study_report.gain_difference(raw, "zoo", "multitask", ["d1", "d2"])
    assert d["ci95"][0] < d["value"] < d["ci95"][1]
