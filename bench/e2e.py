"""End-to-end benchmark on SmolLM2-135M: a zoo of 8 LoRA experts (rank 16) at every `mlp.down_proj`, top-2,
against the plain base, PEFT X-LoRA and PEFT Arrow holding the same 8 adapters (random, made by peft itself);
prefill tokens/s (4x512 tokens) and decode tokens/s (64 new tokens, greedy). Run: `python -m bench.e2e [--quick]`.

Why `mlp.down_proj`: PEFT adapts single projections, so X-LoRA and Arrow put each adapter on down_proj; a zoo LoRA
at that projection site is the same map (y = W x + Σ w_i s B_i A_i x), unlike one at the whole MLP block."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

import expertzoo
from expertzoo.io.peft import building_peft_model
from bench import common
from bench.models import small_smollm2, smollm2

FULL = dict(batch=4, seq=512, prompt=16, new_tokens=64, adapters=8, rank=16)
QUICK = dict(batch=1, seq=64, prompt=8, new_tokens=6, adapters=8, rank=16)
TARGET = "down_proj"


def make_adapters(base: nn.Module, n: int, rank: int, folder: Path) -> list[Path]:
    """n random PEFT LoRA adapters (A and B both random) on every down_proj, saved by peft as folder/a<i>."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[TARGET], lora_dropout=0.0, init_lora_weights=False,
                     task_type="CAUSAL_LM")
    torch.manual_seed(100)
    with building_peft_model():
        model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    with torch.no_grad():  # PEFT's random B is as large as A; shrink the deltas to a realistic size
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    model.save_pretrained(str(folder), selected_adapters=[f"a{i}" for i in range(n)])
    return [folder / f"a{i}" for i in range(n)]


def build_zoo(base: nn.Module, paths: list[Path], router: dict[str, Any]) -> expertzoo.Zoo:
    experts = [{"name": p.name, "kind": "lora", "from": str(p)} for p in paths]
    cfg = {"base": "smollm2-135m", "sites": [f"mlp.{TARGET}"], "experts": experts, "router": {**router, "top_k": 2}}
    return expertzoo.build(cfg, model=copy.deepcopy(base), tokenizer=None)


def build_xlora(base: nn.Module, paths: list[Path]) -> nn.Module:
    from peft import XLoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.config.use_cache = False  # X-LoRA requires it: it reruns the whole sequence for its scalings
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1,
                      adapters={str(i): str(p) for i, p in enumerate(paths)}, top_k_lora=2, enable_softmax=True)
    with building_peft_model():
        return get_peft_model(model, cfg).eval()


def build_arrow(base: nn.Module, paths: list[Path]) -> nn.Module:
    from peft import ArrowConfig, create_arrow_model

    cfg = ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0)
    with building_peft_model():
        return create_arrow_model(copy.deepcopy(base), task_specific_adapter_paths=[str(p) for p in paths],
                                  arrow_config=cfg).eval()


def copy_arrow_prototypes(arrow: nn.Module, zoo: expertzoo.Zoo) -> None:
    """Give the zoo's arrow router PEFT Arrow's own prototypes (power iteration vs our exact SVD would differ in
    the last digits and could flip near-tied routing), so both route every token identically."""
    layers = {name.removeprefix("base_model.model."): m for name, m in arrow.named_modules()
              if hasattr(m, "lora_arrow") and "arrow_router" in m.lora_arrow}
    for layer in zoo.layers:
        protos = layers[layer.site.name].lora_arrow["arrow_router"].prototypes  # [E, d_in], task_0.. in our order
        for i, name in enumerate(layer.router.expert_names):
            layer.router.set_rows(name, prototypes=protos[i])


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def check_same_adapters(base: nn.Module, paths: list[Path], zoo: expertzoo.Zoo, ids: torch.Tensor) -> float:
    """PEFT's plain LoRA with adapter i == the zoo forced to expert i (the adapters are the same)."""
    from peft import PeftModel

    with building_peft_model():
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[0]), adapter_name=paths[0].name)
    peft_model.load_adapter(str(paths[-1]), adapter_name=paths[-1].name)
    worst, effect = 0.0, []
    for p in (paths[0], paths[-1]):
        peft_model.set_adapter(p.name)
        with zoo.force_expert(p.name):
            got = logits(zoo, ids)
            worst = max(worst, common.check_close(f"zoo forced to {p.name} vs PEFT LoRA", got,
                                                  logits(peft_model, ids), atol=2e-4))
        effect.append((got - logits(base, ids)).abs().max().item())
    if min(effect) < 1e-2:
        raise AssertionError(f"the adapters barely change the logits ({min(effect):.3g}); the check would be empty")
    return worst, min(effect)


def prefill(model: nn.Module, ids: torch.Tensor) -> Callable[[], Any]:
    return lambda: logits(model, ids)


def decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, pad_id: int) -> Callable[[], Any]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
    return run


def run(s: common.Settings) -> dict[str, Any]:
    device = common.setup(s)
    p = QUICK if s.quick else FULL
    base, weights = (small_smollm2(device), "random, 4 layers, vocab 4096") if s.quick else smollm2(device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, base.config.vocab_size, (p["batch"], p["seq"]), generator=g).to(device)
    prompt = torch.randint(3, base.config.vocab_size, (1, p["prompt"]), generator=g).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, p["adapters"], p["rank"], Path(tmp))
        zoo = build_zoo(base, paths, {"kind": "learned"}).to(device)
        zoo_arrow = build_zoo(base, paths, {"kind": "arrow"}).to(device)
        xlora, arrow = build_xlora(base, paths).to(device), build_arrow(base, paths).to(device)
        probe = ids[:1, :32]
        checks = dict(zip(("same_adapters", "adapter_effect"), check_same_adapters(base, paths, zoo, probe)))
        arrow_logits = logits(arrow, probe)  # builds PEFT Arrow's prototypes
        copy_arrow_prototypes(arrow, zoo_arrow)
        checks["zoo_arrow_vs_peft_arrow"] = common.check_close("zoo (arrow router) vs PEFT Arrow",
                                                               logits(zoo_arrow, probe), arrow_logits, atol=2e-4)
    models = {"base": base, "zoo": zoo, "zoo_arrow": zoo_arrow, "peft_arrow": arrow, "peft_xlora": xlora}
    sync = common.synchronizer(device)
    reps = s.reps or (3 if s.quick else 5)
    budget = 5.0 if s.quick else 240.0
    pre = common.interleave({n: prefill(m, ids) for n, m in models.items()}, reps=reps, warmup=1, sync=sync,
                            budget_s=budget)
    pad = base.config.pad_token_id or 0
    dec = common.interleave({n: decode(m, prompt, p["new_tokens"], pad) for n, m in models.items()}, reps=reps,
                            warmup=1, sync=sync, budget_s=budget)
    rows = [row(n, pre, dec, p) for n in models]
    goals = summarise(rows, pre, dec)
    notes = [f"SmolLM2-135M ({weights} weights), {p['adapters']} LoRA adapters of rank {p['rank']} on every "
             f"{TARGET}, top-2. Prefill: {p['batch']}x{p['seq']} tokens, one forward without cache. Decode: batch 1, "
             f"{p['prompt']}-token prompt, {p['new_tokens']} new tokens (greedy `generate`; X-LoRA must run without "
             "KV cache and does a scaling pass per step). Checked before timing: the zoo forced to an adapter equals "
             "PEFT's LoRA with that adapter, and the zoo with the arrow router (PEFT's prototypes) equals PEFT Arrow "
             f"(max abs logit differences {checks}; `adapter_effect`: how far an adapter moves the logits from the "
             "base's, so the equalities are not empty). `zoo` routes with a learned top-2 router. Ratios are medians "
             "of per-round ratios."]
    common.write(s, "e2e", {"goals": goals, "checks": checks, "params": p, "weights": weights}, rows, notes)
    return {"rows": rows, "goals": goals}


def row(name: str, pre: dict[str, list[float]], dec: dict[str, list[float]], p: dict[str, int]) -> dict[str, Any]:
    n_pre, n_dec = p["batch"] * p["seq"], p["new_tokens"]
    return {"model": name, "prefill_tok_s": round(n_pre / common.median(pre[name]), 1),
            "decode_tok_s": round(n_dec / common.median(dec[name]), 2),
            "prefill_vs_base": round(1.0 / common.paired_ratio(pre, name, "base"), 3),
            "decode_vs_base": round(1.0 / common.paired_ratio(dec, name, "base"), 3),
            "rounds": len(pre[name])}


def summarise(rows: list[dict[str, Any]], pre: dict[str, list[float]],
              dec: dict[str, list[float]]) -> list[dict[str, Any]]:
    zoo = next(x for x in rows if x["model"] == "zoo")
    out = [{"goal": "zoo prefill tokens/s ≥ 0.85x base", "measured": zoo["prefill_vs_base"],
            "met": zoo["prefill_vs_base"] >= 0.85},
           {"goal": "zoo decode tokens/s ≥ 0.75x base", "measured": zoo["decode_vs_base"],
            "met": zoo["decode_vs_base"] >= 0.75}]
    for other in ("peft_xlora", "peft_arrow"):
        for phase, times in (("prefill", pre), ("decode", dec)):
            ratio = round(common.paired_ratio(times, other, "zoo"), 3)  # t_other / t_zoo: zoo's speed-up
            out.append({"goal": f"zoo {phase} faster than {other} (speed ratio > 1)", "measured": ratio,
                        "met": ratio > 1.0})
    return out


def main(argv: list[str] | None = None) -> None:
    run(common.parse_args(__doc__, argv))


if __name__ == "__main__":
    main()
