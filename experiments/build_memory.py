"""Peak resident memory of building a zoo from 4 fine-tuned SmolLM2-135M copies (ffn experts at all 30 MLPs, read
from memory-mapped safetensors), as a multiple of the finished zoo's weight size; then the zoo's Mixtral and `zoo`
exports are loaded by transformers and compared with the zoo's logits.
Run: .venv/bin/python experiments/build_memory.py   (writes docs/results/build-memory.{json,md})"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertzoo.io.atomic import atomic_dir
from expertzoo.io.base_models import DEFAULT_BASE, cache_dir, load_base

N_COPIES, NOISE = 4, 0.02  # noise relative to each tensor's std
RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TEXT = "def mean(xs):\n    return sum(xs) / len(xs)\n\nThe capital of France is Paris. 12 + 30 = 42."


def make_copies() -> list[Path]:
    """Perturbed copies of the cached SmolLM2 (every tensor), saved as safetensors in the cache (not git)."""
    load_base(DEFAULT_BASE)  # makes sure the cached fp32 folder exists
    source = cache_dir() / "models" / DEFAULT_BASE
    out = []
    for i in range(N_COPIES):
        target = cache_dir() / "finetuned" / f"{DEFAULT_BASE}-ft{i}"
        if not (target / "model.safetensors").is_file():
            g = torch.Generator().manual_seed(i)
            state = load_file(source / "model.safetensors")
            state = {k: v + torch.randn(v.shape, generator=g) * NOISE * v.float().std().nan_to_num(0.0)
                     for k, v in state.items()}
            with atomic_dir(target) as tmp:
                for f in source.iterdir():
                    if f.suffix != ".safetensors":
                        shutil.copy(f, tmp / f.name)
                save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            del state
        out.append(target)
    return out


BUILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    import expertzoo as ez
    from expertzoo.export import export
    torch.set_num_threads(2)
    mode, copies, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    zoo = ez.build({"base": "smollm2-135m", "sites": ["mlp"], "non_expert_params": mode,
                    "experts": [{"name": f"ft{i}", "kind": "ffn", "from": p} for i, p in enumerate(copies)],
                    "router": {"kind": "learned", "top_k": 2}})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tensors = {id(t): t for t in [*zoo.parameters(), *zoo.buffers()]}.values()
    weights = sum(t.numel() * t.element_size() for t in tensors)
    ids = zoo.tokenizer(sys.argv[4], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = zoo(input_ids=ids).logits
    with torch.no_grad(), zoo.force_expert([]):  # the base modules too: every weight has been read once now
        zoo(input_ids=ids)
    touched = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report = {"mode": mode, "peak_rss_bytes": peak, "peak_rss_after_forward_bytes": touched,
              "rss_after_imports_bytes": after_import, "zoo_weight_bytes": weights, "peak_over_weights": peak / weights,
              "peak_after_forward_over_weights": touched / weights, "build_seconds": seconds}
    if out != "-":
        from safetensors.torch import save_file
        save_file({"ids": ids, "logits": logits.contiguous()}, out + ".logits.safetensors")
        export(zoo, out + ".mixtral", "mixtral")
        export(zoo, out + ".zoo", "zoo")
    print(json.dumps(report))
""")

LOAD = textwrap.dedent("""
    import json, sys, torch
    from safetensors.torch import load_file
    if sys.argv[2] == "zoo":
        import expertzoo  # registers the `zoo` model type
    from transformers import AutoModelForCausalLM
    ref = load_file(sys.argv[1] + ".logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1] + "." + sys.argv[2]).eval()
    with torch.no_grad():
        logits = model(input_ids=ref["ids"]).logits
    print(json.dumps({"format": sys.argv[2], "class": type(model).__name__,
                      "max_abs_logit_diff": (logits - ref["logits"]).abs().max().item(),
                      "expertzoo_imported": any(m.startswith("expertzoo") for m in sys.modules)}))
""")


def run(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"subprocess failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    copies = [str(p) for p in make_copies()]
    exports = cache_dir() / "exports" / "build-memory"
    exports.parent.mkdir(parents=True, exist_ok=True)
    builds = [run(BUILD, "base", json.dumps(copies), str(exports), TEXT), run(BUILD, "average", json.dumps(copies), "-", TEXT)]
    loads = [run(LOAD, str(exports), fmt) for fmt in ("mixtral", "zoo")]
    for suffix in (".mixtral", ".zoo", ".logits.safetensors"):
        shutil.rmtree(f"{exports}{suffix}", ignore_errors=True)
        Path(f"{exports}{suffix}").unlink(missing_ok=True)
    report = {"base": DEFAULT_BASE, "copies": N_COPIES, "noise": NOISE, "builds": builds, "exports": loads,
              "torch_threads": 2, "text": TEXT}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "build-memory.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (RESULTS / "build-memory.md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


def markdown(r: dict) -> str:
    gib = 1024 ** 3
    rows = "\n".join(f"| {b['mode']} | {b['zoo_weight_bytes'] / gib:.2f} | {b['rss_after_imports_bytes'] / gib:.2f} | "
                     f"{b['peak_rss_bytes'] / gib:.2f} | **{b['peak_over_weights']:.2f}x** | "
                     f"{b['peak_rss_after_forward_bytes'] / gib:.2f} | {b['peak_after_forward_over_weights']:.2f}x | "
                     f"{b['build_seconds']:.0f} |" for b in r["builds"])
    checks = "\n".join(f"| {e['format']} | {e['class']} | {e['max_abs_logit_diff']:.2e} | {e['expertzoo_imported']} |"
                       for e in r["exports"])
    return (f"# Building a zoo from {r['copies']} fine-tuned {r['base']} checkpoints\n\n"
            f"Each copy is the cached SmolLM2 with every tensor perturbed (noise {r['noise']} x its std), saved as "
            "safetensors. The zoo puts one `ffn` expert per copy at all 30 MLP blocks (learned router, top-2). "
            "Peak = `ru_maxrss` of a fresh process that imports expertzoo and builds the zoo; weights = every "
            "parameter and buffer of the finished zoo (base + 4 x 30 FFNs + routers), fp32. transformers maps the "
            "base's weights lazily, so the peak right after the build can miss base pages never read yet; the "
            "peak after one forward through the zoo and one through the base alone counts every weight resident.\n\n"
            "| non_expert_params | zoo weights (GiB) | RSS after imports (GiB) | peak RSS, build (GiB) | peak / weights | "
            "peak RSS after forwards (GiB) | that / weights | build (s) |\n|---|---|---|---|---|---|---|---|\n"
            f"{rows}\n\n"
            "Exports of the `base` zoo, loaded by `AutoModelForCausalLM.from_pretrained` (mixtral: in a process that "
            "never imports expertzoo), logits compared with the zoo's on one text:\n\n"
            f"| format | class | max abs logit difference | expertzoo imported |\n|---|---|---|---|\n{checks}\n")


if __name__ == "__main__":
    main()
