"""The `zoo` command as a newcomer meets it: quick help that shows every default, outputs never replaced without
--force, --resume that finds nothing, warnings where a router's documented limits apply, checks made before any
heavy work, one convention for data files, and what the terminal and the file system show afterwards."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import expertzoo as ez
from expertzoo.cli import common, demo, export, fit_router, main, merge, parser, train_expert

CONFIG = {"base": "tiny:llama", "sites": ["mlp"], "layers": "all",
          "experts": [{"name": "code", "kind": "lora", "rank": 4, "alpha": 8}, {"name": "math", "kind": "mlp", "hidden": 16}],
          "router": {"kind": "learned", "top_k": 1}}
SRC = str(Path(__file__).resolve().parents[2] / "src")


def write_config(folder: Path, **change) -> Path:
    path = folder / "zoo.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **change}))
    return path


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trust")
    assert main(["build", str(write_config(folder)), "-o", str(folder / "zoo")]) == 0
    return folder / "zoo"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    files = {"code": folder / "code.txt", "math": folder / "math.jsonl"}
    files["code"].write_text("def f(x):\n    return x * 2\n\nimport os\nprint(os.getcwd())\n")
    files["math"].write_text("".join(json.dumps({"text": f"{i} + {i} = {2 * i}"}) + "\n" for i in range(6)))
    return files


def no_load(monkeypatch) -> None:
    """Loading a zoo or a base fails the test: the check under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("expertzoo.build.load.load", refuse)
    monkeypatch.setattr("expertzoo.io.base_models.load_base", refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- help, version

def test_help_imports_no_torch_and_answers_fast():
    code = ("import sys\nfrom expertzoo.cli import main\n"
            "for argv in (['--help'], *[[c, '--help'] for c in ('build', 'eval', 'fit-router', 'train-expert')]):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch was imported'\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "expertzoo", "--help"], capture_output=True, text=True, timeout=120,
                         env=env)
    took = time.perf_counter() - start
    assert run.returncode == 0 and "fit-router" in run.stdout
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "expertzoo", "--help"], capture_output=True,
                         text=True, timeout=120, env=env)  # stderr: one line per module imported
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time")}
    assert "expertzoo.cli" in imported and not imported & {"torch", "transformers", "pydantic", "numpy"}
    assert took < 8.0, f"zoo --help took {took:.1f} s"  # ~0.5 s idle; the bound leaves room for a loaded machine


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"zoo {ez.__version__}"


def test_bench_help_lists_every_option():
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-m", "bench", "--help"], capture_output=True, text=True, timeout=300,
                         cwd=root, env={**os.environ, "PYTHONPATH": f"{root}:{SRC}"})
    assert run.returncode == 0, run.stderr[-2000:]
    for flag in ("--only", "--quick", "--device", "--threads", "--out", "--reps"):
        assert flag in run.stdout, flag


def command_options():
    sub = next(a for a in parser()._actions if a.choices and "build" in a.choices)
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                yield name, p, action


def test_every_option_has_help_and_shows_its_default():
    for name, p, action in command_options():
        assert action.help, f"zoo {name} {action.option_strings[0]} has no help"
        if action.default not in (None, False, []):
            text = " ".join(p.format_help().split())
            shown = f"(default: {action.default})" if "default" not in action.help else "default"
            assert shown in text, f"zoo {name} --help does not show the default of {action.option_strings[0]}"


def test_names_the_help_lists_are_the_registered_ones():
    """The commands list kinds and defaults without importing the modules that define them."""
    from expertzoo.demo import DEFAULTS
    from expertzoo.export import FORMATS
    from expertzoo.extras.merge import METHODS
    from expertzoo.io.base_models import DEFAULT_BASE

    assert export.FORMAT_NAMES == tuple(FORMATS.names())
    assert merge.METHODS == METHODS and demo.DEFAULTS == DEFAULTS and train_expert.DEFAULT_BASE == DEFAULT_BASE
    assert fit_router.FITTED_KINDS == tuple(k for k in ez.ROUTERS if ez.ROUTERS.get(k).fit_from)


# ---------------------------------------------------------------- outputs, --force, --resume

def test_build_onto_a_zoo_needs_force_and_stays_atomic(tmp_path, capsys):
    config = write_config(tmp_path)
    out = tmp_path / "zoo"
    assert main(["build", str(config), "-o", str(out)]) == 0
    before = (out / "experts.safetensors").read_bytes()
    assert main(["build", str(write_config(tmp_path, seed=1)), "-o", str(out)]) == 2
    assert "already a zoo folder; pass --force" in error_line(capsys)
    assert (out / "experts.safetensors").read_bytes() == before
    assert main(["build", str(config), "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo", "zoo.yaml"], "a temporary folder was left behind"


@pytest.mark.parametrize("command", [
    ["train-router", "{zoo}", "--data", "{code}", "--steps", "1"],
    ["fit-router", "{zoo}", "--kind", "centroid", "--data", "code={code}", "math={math}"],
    ["prune", "{zoo}", "--data", "{code}", "--keep", "1"],
])
def test_commands_refuse_to_replace_a_zoo_before_loading(command, zoo_dir, data, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "zoo.json").write_text("{}")
    argv = [a.format(zoo=zoo_dir, **data) for a in command]
    assert main([*argv, "-o", str(out)]) == 2
    assert "already a zoo folder; pass --force" in error_line(capsys)


def test_train_router_resume_without_checkpoint_names_the_folder(zoo_dir, data, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    out = tmp_path / "routed"
    assert main(["train-router", str(zoo_dir), "--data", str(data["code"]), "--steps", "2", "--resume",
                 "-o", str(out)]) == 2
    assert f"--resume: no checkpoint in '{out}.ckpt'" in error_line(capsys)


def test_train_expert_resume_without_checkpoint_names_the_folder(data, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    out = tmp_path / "expert"
    assert main(["train-expert", "--base", "tiny:llama", "--kind", "lora", "--data", str(data["code"]), "--resume",
                 "-o", str(out)]) == 2
    assert f"--resume: no checkpoint in '{out / 'checkpoint'}'" in error_line(capsys)


def test_train_expert_onto_an_expert_folder_needs_force(data, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    out = tmp_path / "expert"
    out.mkdir()
    (out / "expert.json").write_text("{}")
    (out / "expert.safetensors").write_bytes(b"")
    assert main(["train-expert", "--base", "tiny:llama", "--kind", "lora", "--data", str(data["code"]),
                 "-o", str(out)]) == 2
    assert "already an expert folder; pass --force" in error_line(capsys)


# ---------------------------------------------------------------- warnings where a router's limits apply

def test_generating_with_a_router_that_is_not_causal_warns(tmp_path, capsys):
    config = write_config(tmp_path, router={"kind": "expert_choice", "top_k": 1})
    assert main(["build", str(config), "-o", str(tmp_path / "zoo")]) == 0
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert "zoo: warning: the expert_choice router is not causal" in capsys.readouterr().err


def test_evaluating_batches_with_a_batch_dependent_router_warns(tmp_path, data, capsys):
    router = {"kind": "expert_choice", "top_k": 1, "per_sequence": False}
    assert main(["build", str(write_config(tmp_path, router=router)), "-o", str(tmp_path / "zoo")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "zoo"), "--data", str(data["math"]), "--batch-size", "2"]) == 0
    assert "depend on the other sequences of a batch" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "zoo"), "--data", str(data["math"]), "--batch-size", "1"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------------- bad input: one line, before heavy work

@pytest.mark.parametrize("argv, needle", [
    (["generate", "{zoo}", "--prompt", ""], "--prompt is empty"),
    (["generate", "{zoo}", "--prompt", "  "], "--prompt is empty"),
    (["eval", "{zoo}", "--data", "{code}", "--label", "code=code", "--label", "code=math"], "gives dataset 'code' twice"),
    (["eval", "{zoo}", "--data", "{code}", "code={math}"], "names dataset 'code' twice"),
    (["fit-router", "{zoo}", "--kind", "rnd", "--option", "steps=1", "steps=2", "-o", "{tmp}/o"], "gives 'steps' twice"),
    (["fit-router", "{zoo}", "--kind", "nosuch", "-o", "{tmp}/o"], "unknown router kind 'nosuch'"),
    (["train-expert", "--kind", "nosuch", "--data", "{code}", "-o", "{tmp}/o"], "unknown expert kind 'nosuch'"),
])
def test_bad_input_is_refused_before_loading(argv, needle, zoo_dir, data, tmp_path, capsys, monkeypatch):
    no_load(monkeypatch)
    assert main([a.format(zoo=zoo_dir, tmp=tmp_path, **data) for a in argv]) == 2
    assert needle in error_line(capsys)


@pytest.mark.parametrize("argv, needle", [
    (["prune", "z", "--data", "d.txt", "--keep", "0", "-o", "o"], "--keep: 0 is below 1"),
    (["generate", "z", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens: 0 is below 1"),
    (["eval", "z", "--data", "d.txt", "--batch-size", "two"], "--batch-size: 'two' is not a whole number"),
])
def test_numbers_out_of_range_are_refused_by_the_parser(argv, needle, capsys, monkeypatch):
    no_load(monkeypatch)
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2 and needle in capsys.readouterr().err


def test_eval_of_a_folder_that_is_no_zoo_says_so(tmp_path, data, capsys):
    (tmp_path / "notazoo").mkdir()
    (tmp_path / "notazoo" / "notes.txt").write_text("hello")
    assert main(["eval", str(tmp_path / "notazoo"), "--data", str(data["code"])]) == 2
    assert "is not a zoo folder (no zoo.json)" in error_line(capsys)


def test_train_router_on_a_router_without_weights_says_why(tmp_path, data, capsys):
    assert main(["build", str(write_config(tmp_path, router={"kind": "uniform"})), "-o", str(tmp_path / "z")]) == 0
    assert main(["train-router", str(tmp_path / "z"), "--data", str(data["code"]), "--steps", "1",
                 "-o", str(tmp_path / "o")]) == 2
    assert "the uniform router of" in error_line(capsys) and not (tmp_path / "o").exists()


def test_report_only_on_a_fresh_clone_is_one_line(tmp_path):
    """experiments/zoo_smollm2.py --report-only without cached measurements (run where there are none)."""
    script = Path(__file__).resolve().parents[2] / "experiments" / "zoo_smollm2.py"
    code = (f"import runpy, sys, pathlib\nsys.argv = ['zoo_smollm2.py', '--report-only']\n"
            f"g = runpy.run_path({str(script)!r}, run_name='not_main')\n"
            f"g['main'].__globals__['RUNS'] = pathlib.Path({str(tmp_path)!r})\ng['main']()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": SRC})
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (  # after what importing torch may log
        f"zoo_smollm2.py: error: no cached measurements ({tmp_path / 'report-state.json'} does not exist); run "
        "experiments/zoo_smollm2.py without --report-only first")


# ---------------------------------------------------------------- one convention for data files

def test_data_names_paths_and_stems_alike(data):
    items = [f"c={data['code']}", str(data["math"])]
    assert common.named_paths(items) == {"c": str(data["code"]), "math": str(data["math"])}


def test_repeated_data_flags_all_count(zoo_dir, data, tmp_path):
    out = tmp_path / "r.json"
    assert main(["eval", str(zoo_dir), "--data", f"c={data['code']}", "--data", str(data["math"]),
                 "--label", "c=code", "--label", "math=math", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert sorted(report["datasets"]) == ["c", "math"]
    assert all("routing_accuracy" in r for r in report["datasets"].values())


def test_train_router_mixes_every_data_file(zoo_dir, data, tmp_path, capsys):
    assert main(["train-router", str(zoo_dir), "--data", str(data["code"]), "--data", f"m={data['math']}",
                 "--steps", "1", "--max-len", "16", "--quiet", "-o", str(tmp_path / "routed")]) == 0
    one = main(["train-router", str(zoo_dir), "--data", str(data["code"]), "--steps", "1", "--max-len", "16",
                "--quiet", "-o", str(tmp_path / "one")])
    out = capsys.readouterr().out
    counts = [int(line.split(" examples")[0].split()[-1]) for line in out.splitlines() if " examples" in line]
    assert one == 0 and counts[0] > counts[1]


def test_fit_router_shows_progress_while_collecting_inputs(zoo_dir, data, tmp_path, capsys):
    assert main(["fit-router", str(zoo_dir), "--kind", "centroid", "--data", f"code={data['code']}",
                 "--data", f"math={data['math']}", "--option", "temperature=0.2", "--option", "pool=mean",
                 "-o", str(tmp_path / "fitted")]) == 0
    err = capsys.readouterr().err
    assert "inputs code" in err and "inputs math" in err
    options = json.loads((tmp_path / "fitted" / "zoo.json").read_text())["config"]["router"]
    assert options["temperature"] == 0.2 and options["pool"] == "mean"


# ---------------------------------------------------------------- what the terminal and the file system show

def test_generate_echoes_the_prompt(zoo_dir, capsys):
    assert main(["generate", str(zoo_dir), "--prompt", "def f(x):", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("def f(x):")


def test_generated_text_leaves_special_tokens_out():
    from expertzoo.evaluation.generate import generate

    _, tok = ez.load_base("tiny:llama")
    new = tok("ok", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]

    class Scripted:
        def generate(self, ids, **kw):
            return torch.cat([ids, torch.tensor([new])], dim=1)

    text, labels = generate(Scripted(), tok, "hi", max_new_tokens=3)
    assert text == "ok" and labels is None


def test_tables_are_printed_whole(monkeypatch):
    """Output to a file or pipe is taken as 80 columns wide; a wider table is printed at its own width, uncut."""
    import io

    from rich.console import Console

    monkeypatch.setattr(common, "console", Console(width=60, file=io.StringIO()))
    out = common.table("dataset", "NLL deferral", "NLL marginal", "NLL base", "NLL assistant", "deferral rate")
    out.add_row("validation", "1.0000", "1.0000", "1.0000", "1.0000", "10.0%")
    common.show(out)
    lines = common.console.file.getvalue().splitlines()
    assert "…" not in "".join(lines) and len(lines) == 5 and len(lines[0]) > 60
    assert "validation" in lines[3] and "deferral rate" in lines[1]


def test_counts_agree_with_their_nouns(tmp_path, capsys):
    config = write_config(tmp_path, layers=[0], experts=[{"name": "code", "kind": "lora", "rank": 4}])
    assert main(["build", str(config), "-o", str(tmp_path / "zoo")]) == 0
    assert "1 expert at 1 site," in capsys.readouterr().out


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_folders_follow_the_umask(mask, tmp_path):
    old = os.umask(mask)
    try:
        assert main(["build", str(write_config(tmp_path)), "-o", str(tmp_path / "zoo")]) == 0
    finally:
        os.umask(old)
    folder = tmp_path / "zoo"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o666 & ~mask}


# ---------------------------------------------------------------- the Python names the README uses

def test_build_is_a_function_and_a_package():
    from expertzoo.build import assemble

    assert ez.build.from_models is assemble.from_models and ez.build.from_adapters is assemble.from_adapters
    zoo = ez.build(CONFIG)
    assert isinstance(zoo, ez.Zoo) and zoo.expert_names == ["code", "math"]


def test_kind_tables_print_and_iterate():
    assert list(ez.EXPERTS) == ez.EXPERTS.names() and "lora" in ez.EXPERTS and len(ez.ROUTERS) >= 10
    assert repr(ez.EXPERTS).startswith("<expert kinds: ") and "lora" in repr(ez.EXPERTS)
