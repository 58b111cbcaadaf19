"""Export a zoo so that plain transformers (and so vLLM) loads it: `mixtral` / `qwen3_moe` checkpoints for zoos of
whole-FFN experts at the MLP blocks of a Llama/Mistral or Qwen3 base, and `zoo` (any zoo) as the transformers model
type `zoo`, whose Auto classes are registered when expertzoo is imported (no remote code)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec

from ..io.atomic import atomic_dir
from ..config import parse_config
from ..errors import ZooError
from ..registry import Registry
from ..nn.sites import decoder_layers
from ..zoo import Zoo

log = logging.getLogger(__name__)
WEIGHTS = "model.safetensors"
ANY_ZOO = "export with --format zoo, which holds any zoo"
# config keys a MoE export copies from the base
COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
               "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings",
               "rope_parameters", "attention_dropout", "sliding_window", "use_cache")


class ExportFormat:
    """One export format: `write(zoo, folder)` fills an empty folder and returns notes worth telling the user."""

    kind: ClassVar[str]

    def write(self, zoo: Zoo, folder: Path) -> list[str]:
        raise NotImplementedError


FORMATS: Registry[ExportFormat] = Registry("export format")


def export(zoo: Zoo, out: str | Path, fmt: str) -> list[str]:
    """Write `zoo` to `out` (atomically) in format `fmt`; returns notes (e.g. what was duplicated)."""
    writer = FORMATS.get(fmt)()
    with atomic_dir(out) as tmp:
        notes = writer.write(zoo, tmp)
        if zoo.tokenizer is not None:
            zoo.tokenizer.save_pretrained(str(tmp))
        if getattr(zoo.model, "generation_config", None) is not None:
            zoo.model.generation_config.save_pretrained(str(tmp))
    return notes


def _save(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """One safetensors file; tensors that share a buffer (fused expert weights laid out by dispatch) are copied."""
    seen: set[int] = set()
    out = {}
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    save_file(out, folder / WEIGHTS, metadata={"format": "pt"})


# ---------------------------------------------------------------- router forms: a gate matrix and a top-k

def _learned_gate(router: nn.Module, n: int, top_k: int) -> tuple[torch.Tensor, int]:
    return router.weight.detach()[:n], min(top_k, n)  # softmax over all, top-k, renormalised == our top-k softmax


def _uniform_gate(router: nn.Module, n: int, top_k: int) -> tuple[torch.Tensor, int]:
    return torch.zeros(n, router.d_in), n  # equal logits, every expert: weights 1/n


GATES: dict[str, Callable[[nn.Module, int, int], tuple[torch.Tensor, int]]] = {
    "learned": _learned_gate, "uniform": _uniform_gate}


class MoeFormat(ExportFormat):
    """A transformers MoE architecture whose blocks are `softmax top-k (renormalised) over whole FFN experts`."""

    bases: ClassVar[tuple[str, ...]]
    config_type: ClassVar[str]
    architecture: ClassVar[str]
    block: ClassVar[str]  # the MoE block's name in a decoder layer
    expert_keys: ClassVar[dict[str, str]]  # the base MLP's parameter -> the expert's in the checkpoint
    required: ClassVar[dict[str, Any]] = {}  # base config values the architecture assumes
    extra_keys: ClassVar[tuple[str, ...]] = ()

    def check(self, zoo: Zoo) -> None:
        """A clear error naming the first part of the zoo this format cannot express."""
        cfg, spec, fmt = zoo.model.config, zoo.zoo_config.router, self.kind
        if cfg.model_type not in self.bases:
            raise ZooError(f"cannot export a {cfg.model_type} base as {fmt} (it takes {', '.join(self.bases)} bases: "
                           f"the attention must match); {ANY_ZOO}")
        for key, want in self.required.items():
            if getattr(cfg, key, want) != want:
                raise ZooError(f"cannot export as {fmt}: the base has {key}={getattr(cfg, key)!r}, {fmt} assumes "
                               f"{want!r}; {ANY_ZOO}")
        placed = [e.sites for e in zoo.zoo_config.experts if e.sites is not None]
        if list(zoo.zoo_config.sites) != ["mlp"] or any(s != ["mlp"] for s in placed):
            sites = next((s for s in placed if s != ["mlp"]), zoo.zoo_config.sites)
            raise ZooError(f"cannot export as {fmt}: sites {sites} are not the MLP blocks; {fmt} experts "
                           f"are whole FFNs: build the zoo with sites: [mlp], or {ANY_ZOO}")
        if not zoo.expert_names:
            raise ZooError(f"cannot export as {fmt}: the zoo has no experts; add ffn experts")
        if not zoo.rectangular:
            name, here = next((n, s) for n, s in zoo.placement().items() if len(s) < len(zoo.layers))
            raise ZooError(f"cannot export as {fmt}: expert {name!r} sits at {len(here)} of the zoo's {len(zoo.layers)} "
                           f"MoE layers, and {fmt} puts every expert in every MoE layer; give every expert the same "
                           f"layers, or {ANY_ZOO}")
        self._check_experts(zoo)
        for part, value, fine in (("null_experts", spec.null_experts, 0), ("always_on_base", spec.always_on_base, False),
                                  ("granularity", spec.granularity, "token"), ("scope", spec.scope, "layer")):
            if value != fine:
                raise ZooError(f"cannot export as {fmt}: router {part}: {value} has no {fmt} form ({fmt} routes each "
                               f"token at each layer among its experts only); set {part}: {fine!r}, or {ANY_ZOO}")
        if spec.kind not in GATES:
            raise ZooError(f"cannot export as {fmt}: router kind {spec.kind!r} has no {fmt} form (a softmax top-k over a "
                           f"linear map of the hidden state); use kind {' or '.join(GATES)}, or {ANY_ZOO}")

    def _check_experts(self, zoo: Zoo) -> None:
        layer = zoo.layers[0]
        base_keys = set(layer.base_layer.state_dict())
        if base_keys != set(self.expert_keys):
            raise ZooError(f"cannot export as {self.kind}: the base's MLP has parameters {sorted(base_keys)}, {self.kind} "
                           f"experts have {sorted(self.expert_keys)}; {ANY_ZOO}")
        for name, expert in layer.experts.items():
            if expert.mode != "replace" or type(getattr(expert, "module", None)) is not type(layer.base_layer):
                raise ZooError(f"cannot export as {self.kind}: expert {name!r} (kind {expert.kind}, {expert.mode}) is not "
                               f"a whole FFN; {self.kind} experts are copies of the MLP (kind ffn). A LoRA or MLP "
                               f"expert at the block adds its delta to the block's output, which no FFN expert "
                               f"computes exactly; {ANY_ZOO}")

    def moe_config(self, zoo: Zoo, n: int, top_k: int, moe_layers: list[int]) -> PreTrainedConfig:
        base = zoo.model.config.to_dict()
        kw = {k: base[k] for k in (*COMMON_KEYS, *self.extra_keys) if k in base}
        kw.update(self.moe_keys(zoo, n, top_k, moe_layers), architectures=[self.architecture],
                  dtype=str(next(zoo.model.parameters()).dtype).removeprefix("torch."))
        return AutoConfig.for_model(self.config_type, **kw)

    def write(self, zoo: Zoo, folder: Path) -> list[str]:
        self.check(zoo)
        names, spec = zoo.expert_names, zoo.zoo_config.router
        prefix, stack = decoder_layers(zoo.model)
        at_sites = {id(p) for layer in zoo.layers for p in layer.parameters()}
        tensors = {n: p.detach() for n, p in zoo.model.named_parameters() if id(p) not in at_sites}
        top_k = spec.top_k
        for layer in zoo.layers:
            gate, top_k = GATES[spec.kind](layer.router, len(names), spec.top_k)
            block = f"{prefix}.{layer.site.layer}.{self.block}"
            tensors[f"{block}.gate.weight"] = gate.to(next(zoo.model.parameters()).dtype)
            for j, name in enumerate(names):
                for key, t in layer.experts[name].module.state_dict().items():
                    tensors[f"{block}.experts.{j}.{self.expert_keys[key]}"] = t
        moe_layers = sorted(layer.site.layer for layer in zoo.layers)
        notes = self.dense_layers(tensors, prefix, [i for i in range(len(stack)) if i not in moe_layers], len(names))
        self.moe_config(zoo, len(names), top_k, moe_layers).save_pretrained(str(folder))
        _save(tensors, folder)
        return notes

    def moe_keys(self, zoo: Zoo, n: int, top_k: int, moe_layers: list[int]) -> dict[str, Any]:
        raise NotImplementedError

    def dense_layers(self, tensors: dict[str, torch.Tensor], prefix: str, layers: list[int], n: int) -> list[str]:
        """Express the base's MLP of layers outside the zoo (whose tensors are in `tensors` under their own names)."""
        return []


@FORMATS.register("mixtral")
class MixtralFormat(MoeFormat):
    bases = ("llama", "mistral")
    config_type = "mixtral"
    architecture = "MixtralForCausalLM"
    block = "block_sparse_moe"  # the name vLLM and released Mixtral checkpoints use
    expert_keys = {"gate_proj.weight": "w1.weight", "up_proj.weight": "w3.weight", "down_proj.weight": "w2.weight"}
    required = {"attention_bias": False, "mlp_bias": False}

    def moe_keys(self, zoo: Zoo, n: int, top_k: int, moe_layers: list[int]) -> dict[str, Any]:
        jitter = getattr(zoo.zoo_config.router.options, "jitter", 0.0)
        return {"num_local_experts": n, "num_experts_per_tok": top_k, "router_jitter_noise": jitter}

    def dense_layers(self, tensors: dict[str, torch.Tensor], prefix: str, layers: list[int], n: int) -> list[str]:
        """Mixtral has no dense layers: n copies of the base MLP with an all-zero gate (weights 1/n each) == the MLP."""
        for i in layers:
            mlp = {k: tensors.pop(f"{prefix}.{i}.mlp.{k}") for k in self.expert_keys}
            block = f"{prefix}.{i}.{self.block}"
            tensors[f"{block}.gate.weight"] = torch.zeros(n, mlp["down_proj.weight"].shape[0], dtype=mlp["down_proj.weight"].dtype)
            for j in range(n):
                tensors.update({f"{block}.experts.{j}.{self.expert_keys[k]}": t.clone() for k, t in mlp.items()})
        if not layers:
            return []
        return [f"layers {layers} are outside the zoo: mixtral has no dense layers, so each holds {n} copies of the "
                "base MLP under an all-zero gate (exact, at n times the memory); qwen3_moe would keep them dense"]


@FORMATS.register("qwen3_moe")
class Qwen3MoeFormat(MoeFormat):
    bases = ("qwen3",)
    config_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    block = "mlp"
    expert_keys = {"gate_proj.weight": "gate_proj.weight", "up_proj.weight": "up_proj.weight",
                   "down_proj.weight": "down_proj.weight"}
    extra_keys = ("attention_bias", "use_sliding_window")

    def check(self, zoo: Zoo) -> None:
        super().check(zoo)
        kinds = set(getattr(zoo.model.config, "layer_types", None) or ["full_attention"])
        if len(kinds) > 1:
            raise ZooError(f"cannot export as qwen3_moe: the base mixes attention kinds {sorted(kinds)} per layer, "
                           f"which qwen3_moe cannot; {ANY_ZOO}")

    def moe_keys(self, zoo: Zoo, n: int, top_k: int, moe_layers: list[int]) -> dict[str, Any]:
        n_layers = zoo.model.config.num_hidden_layers
        return {"num_experts": n, "num_experts_per_tok": top_k, "norm_topk_prob": True, "decoder_sparse_step": 1,
                "moe_intermediate_size": zoo.model.config.intermediate_size,
                "mlp_only_layers": [i for i in range(n_layers) if i not in moe_layers]}


# ---------------------------------------------------------------- the `zoo` model type: any zoo, for transformers

class ZooModelConfig(PreTrainedConfig):
    """A zoo as a transformers config: the base's config (`text_config`) and the zoo config (`zoo_config`)."""

    model_type = "zoo"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    text_config: dict | PreTrainedConfig | None = None
    zoo_config: dict | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))


class ZooForCausalLM(PreTrainedModel):
    """`AutoModelForCausalLM.from_pretrained(DIR)` of a `--format zoo` export: the base rebuilt from its config,
    the zoo's layers swapped in, then every weight loaded. Forward and generate are the zoo's."""

    config_class = ZooModelConfig
    base_model_prefix = "zoo"
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: ZooModelConfig):
        super().__init__(config)
        base = AutoModelForCausalLM.from_config(config.text_config)
        self.zoo = Zoo(base, None, parse_config(config.zoo_config))
        self._tied_weights_keys = {f"zoo.model.{k}": f"zoo.model.{v}" for k, v in base.all_tied_weights_keys.items()}
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.zoo(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args, **kwargs):
        return self.zoo.generate(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.zoo.model.get_input_embeddings()


@FORMATS.register("zoo")
class ZooFormat(ExportFormat):
    def write(self, zoo: Zoo, folder: Path) -> list[str]:
        config = ZooModelConfig(text_config=zoo.model.config.to_dict(), zoo_config=zoo.saved_config(),
                                architectures=[ZooForCausalLM.__name__],
                                dtype=str(next(zoo.model.parameters()).dtype).removeprefix("torch."))
        config.save_pretrained(str(folder))
        tied = {f"model.{k}" for k in getattr(zoo.model, "all_tied_weights_keys", {}) or {}}
        _save({f"zoo.{k}": v for k, v in zoo.state_dict().items() if k not in tied}, folder)
        return ["load it with `import expertzoo` then transformers.AutoModelForCausalLM.from_pretrained(DIR)"]


def register_auto_classes() -> None:
    """Make the model type `zoo` known to transformers' Auto classes (called when expertzoo is imported)."""
    AutoConfig.register(ZooModelConfig.model_type, ZooModelConfig, exist_ok=True)
    AutoModelForCausalLM.register(ZooModelConfig, ZooForCausalLM, exist_ok=True)


register_auto_classes()
