"""Scale-out: train.fit, and the commands train-expert, train-router, fit-router and collab, under torchrun with 2 CPU
processes (gloo) equal one process with the same global batch; only rank 0 writes and prints."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import expertzoo as ez
from expertzoo.cli import main
from helpers import fresh, perturb

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fit_tiny.py"


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    _run([sys.executable, str(SCRIPT), str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(SCRIPT), str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2 and two["rank_sum"] == 3.0  # both ranks took part
    assert all(abs(a - b) < 1e-5 for a, b in zip(one["losses"], two["losses"]))
    w1, w2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), (key, (w1[key] - w2[key]).abs().max())


# Runs `zoo` commands one after another in this process, as `python -m expertzoo` runs one (`main(argv)`), with this
# rank's stdout and stderr sent to its own file; stops at the first whose exit code is not the one expected (the last
# argument: JSON [[argv, code], ...]). Records for this rank: the exit code of each command, its rank and
# world size, the sum of (rank + 1) over all ranks after each command (3.0 when both ranks reach its end), and every
# file or folder it created, opened for writing, renamed or removed under WATCH (Python audit events).
LAUNCHER = r"""
import json, os, sys
watch, logs, commands = os.path.realpath(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
rank = int(os.environ.get("RANK", "0"))
out = os.open(os.path.join(logs, f"output-{rank}.txt"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
os.dup2(out, 1)
os.dup2(out, 2)
writes = []

def under(path):
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(watch + os.sep)

def audit(event, args):
    if event == "open":
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing and under(args[0]):
            writes.append(("open", os.fsdecode(args[0])))
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree") and under(args[0]):
        writes.append((event, os.fsdecode(args[0])))
    elif event == "os.rename" and (under(args[0]) or under(args[1])):
        writes.append((event, os.fsdecode(args[1])))

sys.addaudithook(audit)
import torch
from expertzoo.cli import main
record = {"rank": rank, "codes": [], "rank_sums": [], "world": None}
for argv, expected in commands:
    code = main(argv)
    record["codes"].append(code)
    if code != expected:
        break
    if torch.distributed.is_initialized():
        seen = torch.tensor([float(rank + 1)])
        torch.distributed.all_reduce(seen)
        record["world"], total = torch.distributed.get_world_size(), float(seen)
    else:
        record["world"], total = 1, float(rank + 1)
    record["rank_sums"].append(total)
record["writes"] = writes
with open(os.path.join(logs, f"rank-{rank}.json"), "w") as f:
    json.dump(record, f)
sys.exit(0 if record["codes"] == [code for _, code in commands] else 1)
"""
COMMANDS = ("train-expert", "train-router", "fit-router", "collab")


def _domain(path: Path, n: int, seed: int) -> str:
    rows = [{"text": f"{(seed + i) % 7} plus {(seed + 2 * i) % 5} makes {(seed + i) % 7 + (seed + 2 * i) % 5}; "
                     f"{i % 3} times two is {2 * (i % 3)}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _argv(inputs: dict[str, str], out: Path) -> list[list[str]]:
    """The four commands, a few steps each on tiny data; train-router's global batch of 3 splits 2 + 1. Its z-loss is
    on (a mean over positions: exact under any split), and so is the Switch balance loss, weighted up to 0.1 (its
    batch fractions are summed over the ranks, so it is exact too)."""
    a, b, zoo = inputs["a"], inputs["b"], inputs["zoo"]
    return [
        ["train-expert", "--base", "tiny:llama", "--kind", "lora", "--option", "rank=4", "alpha=8", "--sites",
         "mlp.down_proj", "attn.q_proj", "--data", a, "--eval-data", b, "--steps", "4", "--batch-size", "4",
         "--max-len", "48", "--lr", "1e-2", "--checkpoint-every", "2", "-o", str(out / "train-expert")],
        ["train-router", zoo, "--data", a, b, "--steps", "4", "--batch-size", "3", "--max-len", "48",
         "--train-embeddings", "--balance-weight", "0.1", "-o", str(out / "train-router")],
        ["fit-router", zoo, "--kind", "phatgoose", "--option", "steps=3", "batch_size=4", "--data", f"a={a}",
         f"b={b}", "--max-len", "48", "-o", str(out / "fit-router")],
        ["collab", "--base", "tiny:llama", "--assistant", zoo, "--data", a, "--eval-data", b, "--steps", "20",
         "--weak-steps", "5", "--max-len", "48", "-o", str(out / "collab")],
    ]


# The saved weights to compare, per command's output folder.
WEIGHTS = {"train-expert": ["expert.safetensors", "peft/adapter_model.safetensors"],
           "train-router": ["experts.safetensors"], "fit-router": ["experts.safetensors"],
           "collab": ["head.safetensors"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The four commands run in this process (1 process) and under torchrun (2 CPU processes, gloo)."""
    root = tmp_path_factory.mktemp("scale_out_cli")
    (root / "in").mkdir()
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "sites": ["mlp.down_proj"], "router": {"kind": "learned", "top_k": 1},
                    "experts": [{"name": "a", "kind": "lora", "rank": 4}, {"name": "b", "kind": "lora", "rank": 4}]},
                   model=model, tokenizer=tok)
    perturb(zoo, scale=0.3)  # experts that change the output: the router and the deferral head have work to do
    zoo.save(root / "in" / "zoo")
    inputs = {"a": _domain(root / "in" / "a.jsonl", 16, 0), "b": _domain(root / "in" / "b.jsonl", 16, 3),
              "zoo": str(root / "in" / "zoo")}
    for argv in _argv(inputs, root / "one"):
        assert main(argv) == 0, argv[0]
    (root / "two").mkdir()
    too_small = ["train-router", inputs["zoo"], "--data", inputs["a"], "--steps", "1", "--batch-size", "1",
                 "-o", str(root / "two" / "too-small")]
    (root / "logs").mkdir()
    (root / "launch.py").write_text(LAUNCHER, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(root / "launch.py"), str(root / "two"), str(root / "logs"),
                           json.dumps([[argv, 0] for argv in _argv(inputs, root / "two")] + [[too_small, 2]])],
                          capture_output=True, text=True, timeout=400, env=env, stdin=subprocess.DEVNULL)
    outputs = {r: (root / "logs" / f"output-{r}.txt").read_text(errors="replace")
               for r in (0, 1) if (root / "logs" / f"output-{r}.txt").is_file()}
    assert proc.returncode == 0, (proc.stderr[-2000:], {r: o[-3000:] for r, o in outputs.items()})
    ranks = [json.loads((root / "logs" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "ranks": ranks, "outputs": outputs}


def test_cli_both_ranks_ran_every_command(runs):
    for r, record in enumerate(runs["ranks"]):
        assert record["rank"] == r and record["world"] == 2 and record["codes"] == [0] * len(COMMANDS) + [2], record
        assert record["rank_sums"] == [3.0] * (len(COMMANDS) + 1), record  # both ranks reached each command's end
    # a global batch of 1 cannot be shared by 2 ranks: a clear error (before: a traceback from the rank left empty)
    assert "zoo: error: batch size 1 is smaller than the 2 processes launched" in runs["outputs"][0]
    assert not (runs["root"] / "two" / "too-small").exists()
    with open(runs["root"] / "one" / "train-expert" / "metrics.json") as f1, \
            open(runs["root"] / "two" / "train-expert" / "metrics.json") as f2:
        one, two = json.load(f1), json.load(f2)
    assert one["processes"] == 1 and two["processes"] == 2
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < 1e-5
    assert abs(one["nll"]["expert"] - two["nll"]["expert"]) < 1e-5


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_two_processes_equal_one(runs, command):
    """Training splits every global batch among the ranks (rows rank::2), so equal weights need both ranks' gradients
    (collab's head is trained whole on each rank)."""
    for name in WEIGHTS[command]:
        w1 = load_file(runs["root"] / "one" / command / name)
        w2 = load_file(runs["root"] / "two" / command / name)
        assert w1.keys() == w2.keys() and w1, (command, name)
        for key in w1:
            diff = (w1[key].float() - w2[key].float()).abs().max().item()
            assert diff <= 1e-5, (command, name, key, diff)
    if command == "collab":
        eta = [json.loads((runs["root"] / n / command / "collab.json").read_text())["eta"] for n in ("one", "two")]
        assert abs(eta[0] - eta[1]) < 1e-5, eta


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_only_rank_0_writes_and_prints(runs, command):
    two = runs["root"] / "two"

    def touches(path: str) -> bool:  # the output folder, or its temporary siblings .NAME.tmp-* / .NAME.old-*
        first = Path(path).relative_to(two).parts[0]
        return first == command or first.startswith(f".{command}.")

    mine = {r: [w for w in record["writes"] if touches(w[1])] for r, record in enumerate(runs["ranks"])}
    assert any(event == "os.rename" and path == str(two / command) for event, path in mine[0]), mine[0]  # seen
    assert mine[1] == [], mine[1]
    assert sorted(p.name for p in (runs["root"] / "two").iterdir()) == sorted(COMMANDS)  # no temporary folder left
    summary = {"train-expert": "expert 'train-expert' (lora) ->", "train-router": "router trained 4 steps",
               "fit-router": "fitted phatgoose router", "collab": "collab folder ->"}[command]
    assert summary in runs["outputs"][0] and summary not in runs["outputs"][1]
    progress = {"train-expert": "held-out expert", "train-router": "router:", "fit-router": "gates a",
                "collab": None}[command]
    if progress:
        assert progress in runs["outputs"][0] and progress not in runs["outputs"][1]
