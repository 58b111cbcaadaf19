"""`--format gguf`: a zoo that exports to Mixtral (or a zoo with no experts: the dense base) written as one GGUF file
(`OUT/model.gguf`, float32 tensors, llama.cpp's `llama` architecture) with the `gguf` package; llama.cpp's own
`llama-quantize` makes smaller files from it."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import ZooError
from ..zoo import Zoo
from .formats import FORMATS, ExportFormat, MixtralFormat

GGUF_FILE = "model.gguf"
ARCH = "llama"  # llama.cpp reads Llama, Mistral and Mixtral (expert_count > 0) as this architecture
BASES = ("llama", "mistral")
# HF tensor name (within model.layers.N.) -> GGUF name (within blk.N.)
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
EXPERT_NAMES = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def _rope_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's q/k rows (rotate-half halves) to llama.cpp's interleaved pairs: [heads * d_head, d] -> same shape."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_checkpoint(zoo: Zoo) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, config) of the zoo as a transformers checkpoint: a Mixtral export, or the base when no experts."""
    if zoo.expert_names:
        with tempfile.TemporaryDirectory() as tmp:
            MixtralFormat().write(zoo, Path(tmp))
            return load_file(Path(tmp) / "model.safetensors"), json.loads((Path(tmp) / "config.json").read_text())
    added = zoo.zoo_state_dict()  # routers of a zoo with no experts: not part of the dense base
    tensors = {k.replace(".base_layer.", "."): v for k, v in zoo.model.state_dict().items() if k not in added}
    return tensors, zoo.model.config.to_dict()


def _gguf_tensors(tensors: dict[str, torch.Tensor], cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """GGUF names -> tensors; experts stacked [n_expert, d_out, d_in], q/k permuted for llama.cpp's rope."""
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"] or cfg["num_attention_heads"]
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key in TOP_NAMES:
            if key != "lm_head.weight" or not cfg.get("tie_word_embeddings"):
                out[TOP_NAMES[key]] = t
            continue
        parts = key.split(".")  # model.layers.N.<rest>
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if rest.startswith("block_sparse_moe.experts."):
            _, _, j, w, _ = rest.split(".")
            experts.setdefault((layer, EXPERT_NAMES[w]), {})[int(j)] = t
            continue
        if rest not in LAYER_NAMES:
            raise ZooError(f"cannot export tensor {key} as GGUF (no llama.cpp name for it); export with --format zoo")
        t = _rope_permute(t, heads) if rest.endswith("q_proj.weight") else \
            _rope_permute(t, kv_heads) if rest.endswith("k_proj.weight") else t
        out[f"blk.{layer}.{LAYER_NAMES[rest]}"] = t
    for (layer, name), by_index in experts.items():
        out[f"blk.{layer}.{name}"] = torch.stack([by_index[j] for j in sorted(by_index)])  # [E, d_out, d_in]
    return out


def _add_tokenizer(writer, tokenizer) -> None:
    """A byte-level BPE tokenizer (tokenizer.json of model type BPE) as llama.cpp's `gpt2` vocabulary."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    model = state.get("model", {})
    if model.get("type") != "BPE":
        raise ZooError(f"cannot write tokenizer {type(tokenizer).__name__} into GGUF: only byte-level BPE tokenizers "
                       "(tokenizer.json model type BPE) are written; export with --format mixtral and convert it "
                       "with llama.cpp's convert_hf_to_gguf.py")
    vocab = {**model["vocab"], **{a["content"]: a["id"] for a in state.get("added_tokens", [])}}
    special = {a["id"] for a in state.get("added_tokens", []) if a.get("special")}
    size = max(len(tokenizer), max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.USER_DEFINED if i not in by_id
             else gguf.TokenType.NORMAL for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or ["\u0120 \u0120"])  # llama.cpp requires the key; a byte vocab has no merges
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    writer.add_add_bos_token(False)
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


@FORMATS.register("gguf")
class GgufFormat(ExportFormat):
    """A Llama/Mistral zoo as llama.cpp's GGUF: the Mixtral export's experts and gates, or the dense base."""

    def check(self, zoo: Zoo) -> None:
        model_type = zoo.model.config.model_type
        if model_type not in BASES:
            raise ZooError(f"cannot export a {model_type} base as gguf (it takes {', '.join(BASES)} bases); "
                           "export with --format zoo")
        if zoo.expert_names:
            MixtralFormat().check(zoo)  # what Mixtral cannot express, GGUF's mixtral cannot either

    def write(self, zoo: Zoo, folder: Path) -> list[str]:
        import gguf

        self.check(zoo)
        tensors, cfg = _hf_checkpoint(zoo)
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        writer = gguf.GGUFWriter(str(folder / GGUF_FILE), ARCH)
        writer.add_name(Path(str(zoo.zoo_config.base)).name)
        writer.add_block_count(cfg["num_hidden_layers"])
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_embedding_length(cfg["hidden_size"])
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(cfg["num_attention_heads"])
        writer.add_head_count_kv(cfg["num_key_value_heads"] or cfg["num_attention_heads"])
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float((cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        if zoo.expert_names:
            writer.add_expert_count(cfg["num_local_experts"])
            writer.add_expert_used_count(cfg["num_experts_per_tok"])
        _add_tokenizer(writer, zoo.tokenizer)
        for name, t in _gguf_tensors(tensors, cfg).items():
            writer.add_tensor(name, t.detach().to(torch.float32).cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        kind = f"{cfg['num_local_experts']} experts" if zoo.expert_names else "dense"
        return [f"wrote {GGUF_FILE} (float32, llama.cpp architecture {ARCH}, {kind})"]
