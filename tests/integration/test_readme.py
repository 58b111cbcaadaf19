"""Every ```python block and every `zoo ...` / `python -c ...` line of the README's ```bash blocks, run in order in
one folder on a tiny model, so a snippet cannot rot. ```yaml blocks that open with `# NAME.yaml` are written to
NAME.yaml first. The few substitutions and skips are listed below with their reasons; data files, fine-tuned
checkpoints and PEFT adapters the snippets name are made small and synthetic before the run."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from expertzoo.cli import main

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

# (README text, what the test runs instead, why)
SUBSTITUTIONS = [
    ("smollm2-135m", "tiny:llama", "the real SmolLM2 takes minutes per command on a CPU; every snippet is the same on "
                                   "a tiny random Llama"),
    ('layers: "24-29"', "layers: all", "the tiny Llama has 2 layers"),
    ("--layers 24-29", "--layers 0-1", "the tiny Llama has 2 layers"),
    ('layers: "18-23"', "layers: [1]", "the tiny Llama has 2 layers"),
    ('layers: "12-17"', "layers: [0]", "the tiny Llama has 2 layers"),
    ('layers: "0-5"', "layers: [0]", "the tiny Llama has 2 layers"),
    ("--steps 200", "--steps 2", "short runs"),
    ("--steps 30", "--steps 2", "short runs"),
    ("--checkpoint-every 50", "--checkpoint-every 1", "a checkpoint within the 2 steps"),
    ("--kind dit --teacher", "--base tiny:llama --distill-steps 4 --distill-tokens 256 --kind dit --teacher",
     "the README relies on the default base, smollm2-135m; short distillation"),
    ("--assistant my-math-zoo", "--assistant my-zoo --steps 4 --weak-steps 2",
     "any zoo on the same base serves as the assistant; short training"),
]
# Snippets not run: (text that marks it, why)
SKIPS = [
    ("lm_eval.simple_evaluate", "lm-eval over the GSM8K half takes minutes; tests/test_lmeval.py runs these tasks"),
    ("--kind arrow", "arrow refuses untrained LoRA experts (B = 0), and the README's LoRA experts are untrained"),
    ("gemma3-270m --prompt", "the real Gemma 3 270M takes minutes on a CPU; tests/real/test_real_gemma3.py runs it"),
    ("--base gemma3-270m", "the real Gemma 3 270M takes minutes on a CPU; tests/real/test_real_gemma3.py runs it"),
    ("from llama_cpp", "llama.cpp is the optional `gguf` extra; tests/integration/test_export_gguf.py runs it when present"),
]
# Run before the line that contains the key: what the README's prose says happened before it
BEFORE = {"--resume -o my-zoo-routed": ("my-zoo-routed", "the first run was interrupted before it saved its zoo")}


def readme_steps(text: str) -> list[tuple[str, str]]:
    """[(kind, code)] in README order: ("yaml", block), ("python", block), ("zoo" | "python-c", one command)."""
    for old, new, _ in SUBSTITUTIONS:
        assert old in text, f"substitution {old!r} no longer matches the README; update tests/test_readme.py"
        text = text.replace(old, new)
    steps = []
    for lang, body in re.findall(r"^```(\w+)\n(.*?)^```", text, flags=re.S | re.M):
        if lang == "yaml" and re.match(r"# [\w.-]+\.yaml\n", body):
            steps.append(("yaml", body))
        elif lang == "python":
            steps.append(("python", body))
        elif lang == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if words[:1] == ["zoo"]:
                    steps.append(("zoo", line))
                elif words[:2] == ["python", "-c"]:
                    steps.append(("python-c", line))
    return steps


def skipped(code: str) -> bool:
    return any(mark in code for mark, _ in SKIPS)


def write_data(folder: Path, steps: list[tuple[str, str]]) -> None:
    """A small synthetic file for every .txt / .jsonl the snippets read and no snippet writes."""
    names = {n for kind, code in steps if kind == "zoo" for n in re.findall(r"[\w/.-]+\.(?:txt|jsonl)\b", code)}
    for name in sorted(names):
        path = folder / name.split("=")[-1]
        stem = path.stem
        if path.suffix == ".txt":
            path.write_text("\n\n".join(f"{stem} document {i}: def f(x): return x * {i}" for i in range(12)))
        else:
            path.write_text("".join(json.dumps({"prompt": f"{stem} question {i}?", "completion": f" answer {i * 7}"})
                                    + "\n" for i in range(12)))


def write_checkpoints(folder: Path) -> None:
    """ckpts/smollm2-{code,math}: fine-tuned stand-ins (save_pretrained folders of perturbed tiny Llamas), and
    adapters/{code,math}: PEFT LoRA adapters on the tiny Llama's q, v and down projections."""
    from peft import LoraConfig, get_peft_model

    from expertzoo.io.base_models import load_base
    from expertzoo.io.peft import building_peft_model

    for i, name in enumerate(("code", "math")):
        model, _ = load_base("tiny:llama")
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(folder / "ckpts" / f"smollm2-{name}")
        model, _ = load_base("tiny:llama")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False)
        with building_peft_model():
            adapter = get_peft_model(model, config)
        adapter.save_pretrained(folder / "adapters" / name)


def run_step(kind: str, code: str, folder: Path) -> None:
    if kind == "yaml":
        name = code.splitlines()[0].removeprefix("# ").strip()
        (folder / name).write_text(code)
    elif kind == "python":
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    elif kind == "zoo":
        for key, (path, _) in BEFORE.items():
            if key in code:
                shutil.rmtree(folder / path)
        assert main(shlex.split(code, comments=True)[1:]) == 0, code
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        run = subprocess.run([sys.executable, "-c", shlex.split(code, comments=True)[2]], capture_output=True,
                             text=True, timeout=300, cwd=folder, env=env)
        assert run.returncode == 0, f"{code}\n{run.stderr[-2000:]}"


@pytest.mark.readme
def test_every_readme_snippet_runs(tmp_path, monkeypatch):
    steps = readme_steps(README.read_text(encoding="utf-8"))
    assert sum(kind == "zoo" for kind, _ in steps) >= 25 and sum(kind == "python" for kind, _ in steps) >= 2
    assert all(any(mark in code for _, code in steps) for mark, _ in SKIPS), "a skip no longer matches the README"
    monkeypatch.chdir(tmp_path)
    write_data(tmp_path, steps)
    write_checkpoints(tmp_path)
    for kind, code in steps:
        if not skipped(code):
            run_step(kind, code, tmp_path)
