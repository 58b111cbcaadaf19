"""Scale-out: train.fit under torchrun with 2 CPU processes (gloo) equals one process with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "fit_tiny.py"


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one(tmp_path):
    _run([sys.executable, str(SCRIPT), str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
          str(SCRIPT), str(tmp_path / "two")])
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2 and two["rank_sum"] == 3.0  # both ranks took part
    assert all(abs(a - b) < 1e-5 for a, b in zip(one["losses"], two["losses"]))
    w1, w2 = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert w1.keys() == w2.keys()
    for key in w1:
        assert torch.allclose(w1[key], w2[key], atol=1e-5), (key, (w1[key] - w2[key]).abs().max())
