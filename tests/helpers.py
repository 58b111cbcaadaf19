"""Test helpers: fresh tiny models (build() mutates the model it wraps), zoo configs, perturbing zero-initialised
expert weights so tests are not trivially true, padding, and a max-abs-difference check."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from peft import LoraConfig, PeftModel, get_peft_model

import expertzoo
from expertzoo import EXPERTS, ROUTERS, ExpertSpec
from expertzoo.io.peft import building_peft_model

PAD = 256  # <pad> of the tiny byte tokenizer
# Small options for the kinds we know (faster); kinds added later are built with their defaults.
SMALL_OPTIONS = {"lora": {"rank": 4}, "mlp": {"hidden": 16}, "dit": {"width": 16, "depth": 1}}
# A projection of the MLP block on each tiny architecture (gpt2 names them c_fc / c_proj).
DOWN_PROJ = {"gpt2": "mlp.c_proj"}


def fresh(arch: str = "llama"):
    """(model, tokenizer): a new tiny model, safe to wrap."""
    return expertzoo.load_base(f"tiny:{arch}")


def expert(name: str, kind: str, **extra) -> dict:
    return {"name": name, "kind": kind, **SMALL_OPTIONS.get(kind, {}), **extra}


def router(kind: str, names: list[str], **extra) -> dict:
    """A router config of `kind`; routers with an `experts` option (fixed) are told to use all `names`."""
    out = {"kind": kind, **extra}
    if "experts" in ROUTERS.get(kind).Options.model_fields:
        out.setdefault("experts", list(names))
    return out


def make_zoo(arch: str = "llama", *, experts=(), router_cfg=None, **config):
    model, tok = fresh(arch)
    cfg = {"base": f"tiny:{arch}", "experts": list(experts), **config}
    if router_cfg is not None:
        cfg["router"] = router_cfg
    return expertzoo.build(cfg, model=model, tokenizer=tok)


def takes(router_kind: str, expert_kinds: Iterable[str]) -> bool:
    """Whether `router_kind` routes experts of these kinds (smear and arrow take LoRA experts only)."""
    specs = [ExpertSpec(**expert(f"e{i}", kind)) for i, kind in enumerate(expert_kinds)]
    try:
        ROUTERS.get(router_kind).check_experts(specs)
    except ValueError:
        return False
    return True


def routers_taking(*expert_kinds: str) -> list[str]:
    """The router kinds that route experts of these kinds: parametrise with it, inapplicable pairs left out."""
    return [r for r in ROUTERS.names() if takes(r, expert_kinds)]


def perturb(zoo, *, seed: int = 0, scale: float = 0.1, router_scale: float = 1.0) -> None:
    """Add noise to every expert parameter (zero-initialised outputs become non-zero) and randomise routers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in zoo.expert_parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
        for p in zoo.router_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * router_scale)


def logits(model, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **kw).logits


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def padded(seqs: list[torch.Tensor], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad 1-D id tensors to one batch: (ids [B,S], attention_mask [B,S])."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span], mask[i, span] = s, 1
    return ids, mask


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol}"


EXPERT_KINDS = EXPERTS.names()
ROUTER_KINDS = ROUTERS.names()


# ---------------------------------------------------------------- PEFT adapters made by peft itself

def make_adapter(path: Path, seed: int, arch: str = "llama", **lora) -> Path:
    """A LoRA adapter made and saved by peft itself, with non-zero B (init_lora_weights=False)."""
    model, _ = fresh(arch)
    torch.manual_seed(seed)
    with building_peft_model():
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
    peft_model.save_pretrained(path)
    return path


def peft_logits(path: Path, ids: torch.Tensor, arch: str = "llama") -> torch.Tensor:
    with building_peft_model():
        peft_model = PeftModel.from_pretrained(fresh(arch)[0], str(path)).eval()
    return logits(peft_model, ids)
