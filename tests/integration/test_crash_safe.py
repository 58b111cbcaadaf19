"""Crash-safe training: a run killed with SIGKILL mid-way and resumed ends with the same weights as an
uninterrupted run; checkpoints are never half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from expertzoo.training.train import latest_checkpoint

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fit_ckpt.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = 40


def _step(ckpt: Path) -> int:
    last = latest_checkpoint(ckpt)
    try:
        return json.loads((last / "trainer.json").read_text())["step"] if last else 0
    except (OSError, ValueError):  # removed as a newer one landed
        return _step(ckpt)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "full"), str(tmp_path / "ck_full"), str(STEPS)],
                   check=True, env=ENV, timeout=300, capture_output=True)
    ckpt = tmp_path / "ck_cut"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path / "cut"), str(ckpt), str(STEPS)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _step(ckpt) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = _step(ckpt)
    assert 3 <= killed_at < STEPS, f"the run was not cut mid-way (checkpoint at step {killed_at})"
    assert not (tmp_path / "cut.safetensors").exists()
    assert load_file(latest_checkpoint(ckpt) / "state.safetensors")  # the checkpoint a kill left is whole
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "cut"), str(ckpt), str(STEPS), "resume"],
                   check=True, env=ENV, timeout=300, capture_output=True)
    full, resumed = load_file(tmp_path / "full.safetensors"), load_file(tmp_path / "cut.safetensors")
    for key in full:
        assert torch.allclose(full[key], resumed[key], atol=1e-6, rtol=0), (key, (full[key] - resumed[key]).abs().max())
