"""Compiled and eager: graph breaks of the zoo forward per router kind x expert kind (`torch._dynamo.explain`, tiny
Llama), then a LoRA zoo (8 rank-16 experts on every `mlp.down_proj`, learned top-2) against its base, each eager
and compiled (`torch.compile(fullgraph=True)` for prefill; `generate` with a static cache and compiled decode steps),
at SmolLM2-135M's shape and at a 1B-class shape (Llama 3.2 1B: d=2048, FFN 8192, 32 heads, 8 KV heads; a few
layers and a small vocabulary on a CPU, the whole model in bfloat16 on a GPU). Random weights: speed does not depend
on their values. Run: `python -m bench.compiled [--quick] [--device cuda]`."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import expertzoo
from expertzoo.data import Example
from expertzoo.nn.compat import compiled_generation
from expertzoo.routers import ROUTERS
from expertzoo.training.fit import fit_router
from bench import common
from bench.models import SMOLLM2, lora_experts, randomise_experts

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu", bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
# per device: (layers, vocab) of each shape (None: the model's own), prefill batch x tokens, decode prompt / new tokens
CPU = {"smollm2": (None, None), "1b": (4, 32000), "prefill": (1, 512), "prompt": 16, "new_tokens": 32}
GPU = {"smollm2": (None, None), "1b": (None, None), "prefill": (8, 1024), "prompt": 64, "new_tokens": 128}
QUICK = {"smollm2": (2, 4096), "1b": (1, 4096), "prefill": (1, 32), "prompt": 4, "new_tokens": 4}
SHAPES = {"smollm2": SMOLLM2, "1b": LLAMA_1B}
EXPERTS, RANK, TOP_K = 8, 16, 2
KINDS = {"lora": {"rank": 4}, "block_lora": {"rank": 4}, "mlp": {"hidden": 16}, "ffn": {}, "dit": {"width": 16, "depth": 1}}
FIT = {"rnd": {"steps": 5, "target_hidden": 16, "predictor_hidden": 8, "out_dim": 4, "batch_size": 64},
       "phatgoose": {"steps": 2, "batch_size": 2}, "rnd_lowrank": {"steps": 5, "rank": 8, "batch_size": 64}}


# ---------------------------------------------------------------- graph breaks

def breaks_table(quick: bool = False) -> list[dict[str, Any]]:
    """Graphs and graph breaks of one zoo forward (2 padded sequences) per router kind x expert kind it routes,
    routers fitted where they are fitted from data; the base alone first (`quick`: every router with LoRA experts
    and the learned router with every kind)."""
    base, tok = expertzoo.load_base("tiny:llama")
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    rows = [explained("base", "-", base, ids, mask)]
    names = ["e1", "e2", "e3"]
    for router in ROUTERS.names():
        for kind, options in KINDS.items():
            if quick and kind != "lora" and router != "learned":
                continue
            spec = {"kind": router, **FIT.get(router, {})}
            if ROUTERS.get(router).supports_null:
                spec["top_k"] = 2
            if "experts" in ROUTERS.get(router).Options.model_fields:
                spec["experts"] = names
            cfg = {"base": "tiny:llama", "experts": [{"name": n, "kind": kind, **options} for n in names],
                   "router": spec}
            try:
                zoo = expertzoo.build(cfg, model=copy.deepcopy(base), tokenizer=tok)
            except (expertzoo.ZooError, ValueError):
                continue  # the router does not route this kind (smear, arrow: LoRA only)
            randomise_experts(zoo)
            fit_from = ROUTERS.get(router).fit_from
            if fit_from is not None:
                data = {n: [Example(list(range(64 * i, 64 * i + 12)), list(range(64 * i, 64 * i + 12)))] * 4
                        for i, n in enumerate(names)}
                fit_router(zoo, None if fit_from == "weights" else data)
            rows.append(explained(router, kind, zoo.model, ids, mask))
    return rows


def explained(router: str, kind: str, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Any]:
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask)
    reason = str(ex.break_reasons[0].reason).splitlines()[0][:80] if ex.break_reasons else ""
    return {"router": router, "expert": kind, "graphs": ex.graph_count, "breaks": ex.graph_break_count,
            "first_break": reason}


# ---------------------------------------------------------------- speed

def model_of(shape: str, layers: int | None, vocab: int | None, device: torch.device, dtype: torch.dtype) -> nn.Module:
    cfg = dict(SHAPES[shape])
    cfg.update({k: v for k, v in (("num_hidden_layers", layers), ("vocab_size", vocab)) if v is not None})
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg)).to(device=device, dtype=dtype).eval()


def lora_zoo(base: nn.Module) -> expertzoo.Zoo:
    cfg = {"base": "smollm2-135m", "sites": ["mlp.down_proj"], "experts": lora_experts(EXPERTS, RANK),
           "router": {"kind": "learned", "top_k": TOP_K}}
    zoo = expertzoo.build(cfg, model=copy.deepcopy(base), tokenizer=None)
    randomise_experts(zoo)
    with torch.no_grad():  # realistic deltas: B small against the base's weights
        for name, p in zoo.model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    return zoo


def forward(model: Callable, ids: torch.Tensor) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return run


def decoder(model: Any, prompt: torch.Tensor, new: int, compiled: bool) -> Callable[[], torch.Tensor]:
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=2)
    if compiled:
        if isinstance(model, expertzoo.Zoo):
            kw["compile"] = True
        else:
            kw.update(compiled_generation(prompt.device))

    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, **kw)
    return run


def speed(shape: str, p: dict[str, Any], device: torch.device, dtype: torch.dtype, reps: int,
          budget: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    layers, vocab = p[shape]
    base = model_of(shape, layers, vocab, device, dtype)
    zoo = lora_zoo(base).to(device)
    g = torch.Generator().manual_seed(0)
    batch, seq = p["prefill"]
    ids = torch.randint(3, base.config.vocab_size, (batch, seq), generator=g).to(device)
    prompt = torch.randint(3, base.config.vocab_size, (1, p["prompt"]), generator=g).to(device)
    torch._dynamo.reset()
    start = time.perf_counter()
    compiled = {"base": torch.compile(base, fullgraph=True, dynamic=False),
                "zoo": torch.compile(zoo.model, fullgraph=True, dynamic=False)}
    eager_zoo = forward(zoo, ids)()
    checks = {"compiled_zoo_vs_eager": common.check_close(f"{shape}: compiled zoo vs eager", forward(compiled["zoo"], ids)(),
                                                          eager_zoo, atol=5e-2 if dtype != torch.float32 else 1e-3)}
    forward(compiled["base"], ids)()
    new = p["new_tokens"]
    eager_tokens = decoder(zoo, prompt, new, False)()
    compiled_tokens = decoder(zoo, prompt, new, True)()
    checks["compiled_greedy_equal_tokens"] = int((compiled_tokens == eager_tokens).all(-1).sum())
    checks["compile_s"] = round(time.perf_counter() - start, 1)
    if device.type == "cuda":
        checks["sync_debug_error"] = host_syncs(zoo, base, ids)
    sync = common.synchronizer(device)
    pre = common.interleave({"base": forward(base, ids), "zoo": forward(zoo, ids),
                             "base_compiled": forward(compiled["base"], ids),
                             "zoo_compiled": forward(compiled["zoo"], ids)}, reps=reps, warmup=1, sync=sync,
                            budget_s=budget)
    dec = common.interleave({"base": decoder(base, prompt, new, False), "zoo": decoder(zoo, prompt, new, False),
                             "base_compiled": decoder(base, prompt, new, True),
                             "zoo_compiled": decoder(zoo, prompt, new, True)}, reps=reps, warmup=1, sync=sync,
                            budget_s=budget)
    rows = []
    for name in pre:
        ref = "base_compiled" if name.endswith("compiled") else "base"
        rows.append({"shape": shape, "model": name, "prefill_tok_s": round(batch * seq / common.median(pre[name]), 1),
                     "decode_tok_s": round(new / common.median(dec[name]), 2),
                     "prefill_vs_base": round(1.0 / common.paired_ratio(pre, name, ref), 3),
                     "decode_vs_base": round(1.0 / common.paired_ratio(dec, name, ref), 3), "rounds": len(pre[name])})
    info = {"layers": base.config.num_hidden_layers, "vocab": base.config.vocab_size, "prefill": [batch, seq],
            "prompt": p["prompt"], "new_tokens": new, "checks": checks}
    return rows, info


def host_syncs(zoo: expertzoo.Zoo, base: nn.Module, ids: torch.Tensor) -> dict[str, str]:
    """Whether one eager forward runs under `torch.cuda.set_sync_debug_mode("error")` (a host sync raises): the base
    alone, and the zoo; 'none' or the error's first line."""
    out = {}
    for name, model in (("base", base), ("zoo", zoo)):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            forward(model, ids)()
            out[name] = "none"
        except RuntimeError as err:
            out[name] = str(err).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return out


def run(s: common.Settings) -> dict[str, Any]:
    device = common.setup(s)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    p = QUICK if s.quick else (GPU if gpu else CPU)
    reps = s.reps or (3 if s.quick else 5)
    budget = 5.0 if s.quick else 150.0
    breaks = breaks_table(s.quick)
    rows, shapes = [], {}
    for shape in (["smollm2"] if s.quick else SHAPES):
        r, info = speed(shape, p, device, dtype, reps, budget)
        rows += r
        shapes[shape] = info
    goals = summarise(rows, breaks, gpu)
    notes = [f"LoRA zoo: {EXPERTS} experts of rank {RANK} on every mlp.down_proj, learned top-{TOP_K}, random "
             f"weights, {str(dtype).removeprefix('torch.')}. `*_compiled`: prefill through torch.compile(fullgraph="
             "True, dynamic=False); decode through generate with a static KV cache and compiled decode steps "
             "(`Zoo.generate(compile=True)`, the base through the same transformers options). Ratios: the zoo against "
             "the base run the same way (eager vs eager, compiled vs compiled), medians of per-round ratios.",
             "Shapes: " + "; ".join(f"{k}: {v['layers']} layers, vocab {v['vocab']}, prefill {v['prefill'][0]}x"
                                    f"{v['prefill'][1]} tokens, decode {v['prompt']}-token prompt + {v['new_tokens']} "
                                    f"new tokens; checks {v['checks']}" for k, v in shapes.items()) + ".",
             "", "Graph breaks of one zoo forward (torch._dynamo.explain, tiny Llama, 3 experts, 2 padded sequences):",
             ""]
    notes += ["| router | expert | graphs | breaks | first break |", "|---|---|---|---|---|"]
    notes += [f"| {b['router']} | {b['expert']} | {b['graphs']} | {b['breaks']} | {b['first_break']} |" for b in breaks]
    common.write(s, "compiled", {"goals": goals, "shapes": shapes, "breaks": breaks, "dtype": str(dtype)}, rows, notes)
    return {"rows": rows, "goals": goals, "breaks": breaks}


def summarise(rows: list[dict[str, Any]], breaks: list[dict[str, Any]], gpu: bool) -> list[dict[str, Any]]:
    token_choice = [b for b in breaks if b["router"] not in ("base", "expert_choice")]
    broken = sum(b["breaks"] > 0 for b in token_choice)
    goals = [{"goal": "0 graph breaks for every token-choice router x expert kind", "measured":
              f"{broken} of {len(token_choice)} pairs break", "met": broken == 0}]
    at = {(r["shape"], r["model"]): r for r in rows}
    pre_goal, dec_goal = (0.9, 0.8) if gpu else (0.95, 0.85)
    for shape in SHAPES:
        for model in ("zoo", "zoo_compiled"):
            if (shape, model) not in at:
                continue
            r = at[(shape, model)]
            goals.append({"goal": f"{shape} {model} prefill ≥ {pre_goal}x base", "measured": r["prefill_vs_base"],
                          "met": r["prefill_vs_base"] >= pre_goal})
            goals.append({"goal": f"{shape} {model} decode ≥ {dec_goal}x base", "measured": r["decode_vs_base"],
                          "met": r["decode_vs_base"] >= dec_goal})
    return goals


def main(argv: list[str] | None = None) -> None:
    run(common.parse_args(__doc__, argv))


if __name__ == "__main__":
    main()
