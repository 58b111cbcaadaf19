"""Router rows of `init: mergekit*` against the gates of the mergekit package (mergekit.moe.router.get_gate_params)
on SmolLM2-135M (its cached safetensors folder), two experts with positive and negative prompts: min row cosine over
all 30 layers and both experts, per gate mode; and against our `init: hidden` for contrast.
Run (in a venv with mergekit): python experiments/mergekit_gates.py   (writes docs/results/mergekit-gates.{json,md})"""
from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from mergekit.common import ModelReference
from mergekit.moe.config import Expert
from mergekit.moe.router import get_gate_params

import expertzoo as ez
from expertzoo.io.base_models import DEFAULT_BASE, cache_dir

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
PROMPTS = {"code": (["def f(x):\n    return x * 2", "import os\nfor name in os.listdir('.'):"], ["Bonjour, comment allez-vous ?"]),
           "math": (["What is 12 * 7?", "Solve 3x + 2 = 11 for x.", "A train travels 60 km in 1.5 hours."], [])}
SEED = 3


def zoo_rows(init: str) -> torch.Tensor:  # [L, E, d]
    experts = [{"name": n, "kind": "lora", "rank": 2, "positive_prompts": p, "negative_prompts": q}
               for n, (p, q) in PROMPTS.items()]
    zoo = ez.build({"base": DEFAULT_BASE, "sites": ["mlp"], "experts": experts, "seed": SEED,
                    "router": {"kind": "learned", "top_k": 1, "init": init}})
    return torch.stack([r.weight.detach()[:2] for r in zoo.routers()])


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # [L, E]
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def mergekit_folder() -> Path:
    """The cached SmolLM2 with its tied embedding stored under model.embed_tokens.weight, where mergekit reads it."""
    source, folder = cache_dir() / "models" / DEFAULT_BASE, cache_dir() / "models" / f"{DEFAULT_BASE}-untied-names"
    if not (folder / "model.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        state = load_file(source / "model.safetensors")
        state.setdefault("model.embed_tokens.weight", state["lm_head.weight"].clone())
        for f in source.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy(f, folder / f.name)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def main() -> None:
    ez.load_base(DEFAULT_BASE)
    folder = mergekit_folder()
    tok = ez.load_base(DEFAULT_BASE)[1]
    tok.padding_side, tok.pad_token_id = "left", tok.bos_token_id
    experts = [Expert(source_model=ModelReference.parse(str(folder)), positive_prompts=p, negative_prompts=q or None)
               for p, q in PROMPTS.values()]
    rows = {"mergekit": version("mergekit"), "modes": {}}
    for mode in ("hidden", "hidden_avg", "cheap_embed", "random"):
        torch.manual_seed(SEED)
        theirs = get_gate_params(ModelReference.parse(str(folder)), tok, experts, mode=mode, device="cpu")
        ours = zoo_rows("mergekit" if mode == "hidden" else f"mergekit_{mode}")
        c = cosines(ours, theirs)
        rows["modes"][mode] = {"min_row_cosine": c.min().item(), "mean_row_cosine": c.mean().item(),
                               "equal_values": torch.equal(ours, theirs.float()),
                               "max_abs_diff": (ours - theirs.float()).abs().max().item()}
        if mode == "hidden":
            h = cosines(zoo_rows("hidden"), theirs)
            rows["init_hidden_vs_mergekit_hidden"] = {"min": h.min().item(), "max": h.max().item(),
                                                      "per_layer_min": h.min(1).values.tolist()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "mergekit-gates.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["# `init: mergekit*` vs mergekit-moe's gates on SmolLM2-135M", "",
             f"`python experiments/mergekit_gates.py` (mergekit {rows['mergekit']}); 2 experts, 30 layers; random with "
             f"torch seed {SEED} on both sides.", "", "| gate mode | our init | min row cosine | mean row cosine | same values | max abs diff |",
             "|---|---|---|---|---|---|"]
    for mode, r in rows["modes"].items():
        ours = "mergekit" if mode == "hidden" else f"mergekit_{mode}"
        lines.append(f"| {mode} | {ours} | {r['min_row_cosine']:.7f} | {r['mean_row_cosine']:.7f} | {r['equal_values']} | "
                     f"{r['max_abs_diff']:.1e} |")
    h = rows["init_hidden_vs_mergekit_hidden"]
    lines += ["", "Cosines print as just under 1 where the values are equal: float32 rounding of the cosine itself.",
              "Before RoPE's float32 `inv_freq` was kept (our bfloat16 copy of the base rounded it with `model.to`, which "
              "mergekit's `from_pretrained(torch_dtype=bfloat16)` does not), hidden's min row cosine was 0.99968 and "
              "hidden_avg's 0.99985.", "", f"For contrast, `init: hidden` (the gate's own input) vs mergekit `hidden`: row cosines "
                  f"{h['min']:.2f}–{h['max']:.2f}."]
    (RESULTS / "mergekit-gates.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
