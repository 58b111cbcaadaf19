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
