"""Models the benchmarks share: a one-layer Llama with SmolLM2-135M's MLP shape, zoo layers of FFN or LoRA experts
built on it with random expert weights, router weights for even or skewed load, and the SmolLM2 base itself."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from transformers import LlamaConfig, LlamaForCausalLM

import expertzoo
from expertzoo.nn.layer import ZooLayer

D_MODEL, D_FFN = 576, 1536  # SmolLM2-135M
SMOLLM2 = dict(hidden_size=D_MODEL, intermediate_size=D_FFN, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
               rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, hidden_act="silu",
               bos_token_id=1, eos_token_id=2, pad_token_id=2)


def one_layer_base(device: torch.device) -> LlamaForCausalLM:
    """A random one-layer Llama with SmolLM2's MLP (d=576, FFN 1536), vocab 256: a host for one zoo layer."""
    cfg = LlamaConfig(**{**SMOLLM2, "num_hidden_layers": 1, "vocab_size": 256, "pad_token_id": 0, "bos_token_id": 1,
                         "eos_token_id": 2})
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device).eval()


def smollm2(device: torch.device) -> tuple[nn.Module, str]:
    """SmolLM2-135M: the real weights when they are cached or installable here, else its architecture with random
    weights (speed does not depend on weight values). Returns (model, what) with what in {"real", "random"}."""
    try:
        model, _ = expertzoo.load_base("smollm2-135m")
        return model.to(device).eval(), "real"
    except (expertzoo.ZooError, OSError, ImportError):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**SMOLLM2)).to(device).eval(), "random"


def small_smollm2(device: torch.device, layers: int = 4, vocab: int = 4096) -> LlamaForCausalLM:
    """SmolLM2's layer shapes with fewer layers and a smaller vocabulary, random weights: quick end-to-end runs."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers, "vocab_size": vocab})).to(device).eval()


def zoo_layer(model: nn.Module, *, experts: list[dict[str, Any]], top_k: int, null_experts: int = 0,
              site: str = "mlp", router: str = "learned") -> tuple[expertzoo.Zoo, ZooLayer]:
    """Build a zoo with `experts` at `site` of layer 0 only; returns (zoo, its layer). Expert weights randomised."""
    cfg = {"base": "smollm2-135m", "sites": [site], "layers": [0], "experts": experts,
           "router": {"kind": router, "top_k": top_k, "null_experts": null_experts}}
    device = next(model.parameters()).device
    zoo = expertzoo.build(cfg, model=model, tokenizer=None).to(device)
    randomise_experts(zoo)
    return zoo, zoo.layers[0]


def randomise_experts(zoo: expertzoo.Zoo, seed: int = 1) -> None:
    """Distinct random weights for every expert (fresh FFN copies are identical, fresh LoRA B is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in zoo.expert_parameters():
            std = 1.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 0.02
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p))


def ffn_experts(n: int) -> list[dict[str, Any]]:
    return [{"name": f"ffn{i}", "kind": "ffn"} for i in range(n)]


def lora_experts(n: int, rank: int = 16) -> list[dict[str, Any]]:
    return [{"name": f"lora{i}", "kind": "lora", "rank": rank, "alpha": 2.0 * rank} for i in range(n)]


def router_weights(n_experts: int, d: int, load: str, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(router weight [E, d], shift [d]): logits of inputs `randn + shift` are N(0,1) noise plus a per-expert offset,
    0 for `even` load, decreasing with the expert's index for `skewed` load (about half the slots go to 2 experts)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_experts, d, generator=g) / math.sqrt(d)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    offsets = torch.zeros(n_experts) if load == "even" else 2.5 * torch.linspace(1.0, 0.0, n_experts) ** 2
    shift = 4.0 * u  # every input gets this component; w's extra u-part turns it into the per-expert offset
    return w + offsets[:, None] * u[None, :] / 4.0, shift


def load_stats(indices: torch.Tensor, n_experts: int) -> dict[str, float]:
    """How the slots spread over experts: share of the busiest expert and number of experts used."""
    flat = indices[indices >= 0].flatten()
    counts = torch.bincount(flat.cpu(), minlength=n_experts).float()
    return {"max_share": round((counts.max() / counts.sum().clamp(min=1)).item(), 3),
            "experts_used": int((counts > 0).sum().item())}
