"""Hub ids for `base:` and `from:`, offline: the test lays out a Hugging Face cache the way huggingface_hub does
(models--org--name/refs, snapshots/<commit>) and the zoo resolves ids and revisions from it."""
from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

import expertzoo as ez
from expertzoo.io.hub import is_hub_id
from helpers import assert_close, fresh, logits, make_adapter, peft_logits
from test_peft import TARGETS

COMMITS = ("a" * 40, "b" * 40)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def put_in_cache(cache: Path, repo: str, folder: Path, commit: str, ref: str | None = "main") -> None:
    """Copy `folder` in as `repo` at `commit` (blobs are plain copies; huggingface_hub links them, reading is alike)."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    if ref is not None:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(commit)


def saved_tiny(path: Path, seed: int) -> Path:
    model, tok = fresh()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + i)) * 0.01)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hub_ids_are_told_from_paths(tmp_path):
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hub_id("org/name@v1.0")
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert not is_hub_id(str(tmp_path / "org" / "name")) and not is_hub_id("tiny:llama") and not is_hub_id("a/b/c")


def test_base_hub_id_loads_main_and_a_revision(hub_cache, tmp_path, ids):
    put_in_cache(hub_cache, "org/tiny", saved_tiny(tmp_path / "v1", 1), COMMITS[0])
    put_in_cache(hub_cache, "org/tiny", saved_tiny(tmp_path / "v2", 2), COMMITS[1], ref=None)
    main, _ = ez.load_base("org/tiny")
    assert_close(logits(main, ids), logits(ez.load_base(str(tmp_path / "v1"))[0], ids), atol=0)
    pinned, _ = ez.load_base(f"org/tiny@{COMMITS[1]}")
    assert_close(logits(pinned, ids), logits(ez.load_base(str(tmp_path / "v2"))[0], ids), atol=0)
    zoo = ez.build({"base": "org/tiny", "sites": ["mlp"], "experts": [{"name": "a", "kind": "lora", "rank": 2}]})
    assert zoo.zoo_config.base == "org/tiny"


def test_adapter_hub_id_in_from_equals_peft(hub_cache, tmp_path, ids):
    adapter = make_adapter(tmp_path / "adapter", 0, r=4, lora_alpha=8, target_modules=TARGETS)
    put_in_cache(hub_cache, "some-org/some-adapter", adapter, COMMITS[0])
    model, tok = fresh()
    zoo = ez.build({"base": "tiny:llama", "sites": ["attn.q_proj", "attn.v_proj", "mlp.down_proj"],
                    "experts": [{"name": "a", "kind": "lora", "from": "some-org/some-adapter"}]},
                   model=model, tokenizer=tok)
    with zoo.force_expert("a"):
        assert_close(logits(zoo, ids), peft_logits(adapter, ids), atol=1e-5)


def test_pickled_weights_and_missing_ids_are_refused(hub_cache, tmp_path):
    pickled = saved_tiny(tmp_path / "pickled", 0)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    put_in_cache(hub_cache, "org/pickled", pickled, COMMITS[0])
    with pytest.raises(ez.ZooError, match="no \\*.safetensors weights"):
        ez.load_base("org/pickled")
    with pytest.raises(ez.ZooError, match="'org/absent' is not in the Hugging Face cache.*hf download org/absent"):
        ez.load_base("org/absent")
