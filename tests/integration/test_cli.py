"""The `zoo` command on tiny models: build, info, generate, eval (JSON contract), and exit code 2 on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from expertzoo.cli import main

CONFIG = {
    "base": "tiny:llama",
    "sites": ["mlp"],
    "layers": "all",
    "experts": [{"name": "code", "kind": "lora", "rank": 4, "alpha": 8}, {"name": "math", "kind": "mlp", "hidden": 16}],
    "router": {"kind": "learned", "top_k": 1, "null_experts": 1},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


@pytest.fixture
def built(tmp_path: Path, config_file: Path) -> Path:
    out = tmp_path / "zoo"
    assert main(["build", str(config_file), "-o", str(out)]) == 0
    return out


def test_build_writes_config_and_weights(built: Path):
    meta = json.loads((built / "zoo.json").read_text())
    assert meta["config"]["base"] == "tiny:llama"
    assert [e["name"] for e in meta["config"]["experts"]] == ["code", "math"]
    assert (built / "experts.safetensors").stat().st_size > 0
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")], "temporary folders were left behind"


def test_info_lists_experts(built: Path, capsys):
    assert main(["info", str(built)]) == 0
    out = capsys.readouterr().out
    assert "code" in out and "lora" in out and "math" in out and "learned" in out


def test_generate_with_routing(built: Path, capsys):
    assert main(["generate", str(built), "--prompt", "hello", "--max-new-tokens", "4", "--show-routing"]) == 0
    out = capsys.readouterr().out
    assert any(f"[{n}]" in out for n in ("code", "math", "base"))


def test_eval_json_contract(built: Path, tmp_path: Path):
    txt = tmp_path / "a.txt"
    txt.write_text("first document with some words\n\nsecond document here\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"prompt": "2+2=", "completion": "4"}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    out = tmp_path / "r.json"
    assert main(["eval", str(built), "--data", f"a={txt}", f"b={jsonl}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["base"] == "tiny:llama" and report["experts"] == ["code", "math"]
    for name in ("a", "b"):
        r = report["datasets"][name]
        assert r["tokens"] > 0 and r["nll"] > 0 and r["ppl"] == pytest.approx(2.718281828 ** r["nll"], rel=1e-6)
        assert 0.0 <= r["load"] <= 1.0  # top-1 over 2 experts + 1 null slot
        shares = r["expert_share"]
        assert set(shares) == {"code", "math"}
        assert sum(shares.values()) == pytest.approx(1.0) or r["load"] == 0.0
    # prompt tokens carry no loss: "4" + EOS scored, plus "plain" + EOS minus the first token
    assert report["datasets"]["b"]["tokens"] == 2 + (len("plain") + 1 - 1)


def test_eval_of_a_base_spec(tmp_path: Path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_text("some words for the base\n")
    assert main(["eval", "tiny:llama", "--data", f"a={txt}"]) == 0
    assert "a" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["info", "no/such/zoo"], "not a zoo folder"),
        (["build", "missing.yaml", "-o", "x"], "does not exist"),
        (["eval", "tiny:llama", "--data", "=held.txt"], "NAME=PATH"),
        (["eval", "tiny:llama", "--data", "nopath"], "file 'nopath' does not exist"),
        (["eval", "tiny:llama", "--data", "a=missing.txt"], "file 'missing.txt' does not exist"),
        (["generate", "tiny:nosucharch", "--prompt", "x"], "nosucharch"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"experts": [{"name": "Code!", "kind": "lora"}]}, "[a-z0-9_-]+"),
        ({"experts": [{"name": "a", "kind": "nosuch"}]}, "nosuch"),
        ({"router": {"kind": "nosuch"}}, "nosuch"),
        ({"sites": ["nosuch"]}, "nosuch"),
        ({"layers": [7]}, "layer 7"),
        ({"experts": [{"name": "a", "kind": "lora", "rnak": 4}]}, "rnak"),
    ],
)
def test_bad_config_exits_2_and_writes_nothing(change, needle, tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **change}))
    out = tmp_path / "out"
    assert main(["build", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.yaml"]


def test_malformed_yaml_exits_2(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("base: tiny:llama\nexperts: [\n")
    assert main(["build", str(path), "-o", str(tmp_path / "out")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path: Path):
    """The installed entry point (python -m expertzoo) maps bad input to exit code 2."""
    proc = subprocess.run([sys.executable, "-m", "expertzoo", "info", str(tmp_path / "nothing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not a zoo folder" in proc.stderr


def test_sequence_routed_generate_raises_no_library_warning(tmp_path: Path):
    """`python -W error::FutureWarning -W error::DeprecationWarning -m expertzoo generate` on a sequence-routed zoo:
    the zoo passes the KV cache and reads model outputs the way the installed transformers asks, so no warning."""
    config = {**CONFIG, "router": {"kind": "learned", "top_k": 1, "granularity": "sequence"}}
    path = tmp_path / "zoo.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["build", str(path), "-o", str(tmp_path / "zoo")]) == 0
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-m",
                           "expertzoo", "generate", str(tmp_path / "zoo"), "--prompt", "hello", "--max-new-tokens", "6"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Warning" not in proc.stderr, proc.stderr[-2000:]
