"""Bad files and folders: config files, damaged zoo folders, non-safetensors or mismatched checkpoints, and saves
that must refuse to overwrite or must leave the previous zoo intact."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

import expertzoo
import expertzoo.io.zoo_folder
from expertzoo import ZooError, load_config
from helpers import assert_close, expert, fresh, logits, make_zoo, perturb


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


@pytest.fixture
def saved_zoo(tmp_path):
    """A saved zoo folder (perturbed lora) and its logits on a fixed batch."""
    zoo = make_zoo(experts=[expert("a", "lora")])
    perturb(zoo)
    ids = torch.arange(12).reshape(2, 6)
    zoo.save(tmp_path / "zoo")
    return tmp_path / "zoo", ids, logits(zoo, ids)


# ---------------------------------------------------------------- config files

def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ZooError) as err:
        load_config(path)
    assert str(path) in one_line(err) and "does not exist" in str(err.value)
    with pytest.raises(ZooError):
        expertzoo.build(str(path))


def test_malformed_yaml(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text("experts:\n  - {name: a, kind: lora\nrouter: [\n", encoding="utf-8")
    with pytest.raises(ZooError) as err:
        load_config(path)
    assert str(path) in one_line(err) and "not valid YAML at line" in str(err.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text("- mlp\n- attn\n", encoding="utf-8")
    with pytest.raises(ZooError, match="must be a mapping"):
        load_config(path)


def test_yaml_not_utf8(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_bytes(b"base: \xff\xfe\n")
    with pytest.raises(ZooError, match="not UTF-8"):
        load_config(path)


def test_yaml_with_bad_content_names_the_field(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text("experts:\n  - {name: Code!, kind: lora}\n", encoding="utf-8")
    with pytest.raises(ZooError, match=r"'Code!' must match \[a-z0-9_-\]\+"):
        load_config(path)


# ---------------------------------------------------------------- damaged zoo folders

@pytest.mark.parametrize("content", ["pickle", "garbage", "empty", "truncated"])
def test_load_unreadable_weights_names_the_file(content, saved_zoo):
    folder, _, _ = saved_zoo
    weights = folder / "experts.safetensors"
    if content == "pickle":
        torch.save({"model.layers.0.mlp.experts.a.lora_A": torch.ones(4, 64)}, weights)
    elif content == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        weights.write_bytes(b"" if content == "empty" else b"\x00not safetensors at all" * 10)
    with pytest.raises(ZooError) as err:
        expertzoo.load(folder)
    assert str(weights) in one_line(err) and "safetensors" in str(err.value)


def test_load_folder_without_weights(saved_zoo):
    folder, _, _ = saved_zoo
    (folder / "experts.safetensors").unlink()
    with pytest.raises(ZooError, match="lacks experts.safetensors"):
        expertzoo.load(folder)


def test_load_folder_without_zoo_json(tmp_path):
    with pytest.raises(ZooError, match="not a zoo folder"):
        expertzoo.load(tmp_path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format_version": 99, "config": {}}), "[1, 2]",
                                  json.dumps({"format_version": 1}), json.dumps({"format_version": 1, "config": [1]})])
def test_load_bad_zoo_json(text, saved_zoo):
    folder, _, _ = saved_zoo
    (folder / "zoo.json").write_text(text, encoding="utf-8")
    with pytest.raises(ZooError) as err:
        expertzoo.load(folder)
    assert "zoo.json" in one_line(err)


def test_load_weights_of_another_config(saved_zoo, tmp_path):
    folder, _, _ = saved_zoo
    other = make_zoo(experts=[expert("b", "lora")])
    other.save(tmp_path / "other")
    (tmp_path / "other" / "experts.safetensors").replace(folder / "experts.safetensors")
    with pytest.raises(ZooError, match="experts.safetensors.*different zoo config"):
        expertzoo.load(folder)


def test_load_weights_with_nan(saved_zoo):
    folder, _, _ = saved_zoo
    state = load_file(folder / "experts.safetensors")
    key = sorted(state)[0]
    state[key][0] = float("nan")
    save_file(state, folder / "experts.safetensors")
    with pytest.raises(ZooError, match=f"'{key}' holds NaN"):
        expertzoo.load(folder)


# ---------------------------------------------------------------- ffn `from:` checkpoints

def ffn_from(source) -> dict:
    return {"name": "ft", "kind": "ffn", "from": str(source)}


def test_ffn_from_bin_file_refused(tmp_path):
    model, _ = fresh("llama")
    (tmp_path / "ft").mkdir()
    torch.save(model.state_dict(), tmp_path / "ft" / "pytorch_model.bin")
    for source in (tmp_path / "ft", tmp_path / "ft" / "pytorch_model.bin"):
        with pytest.raises(ZooError) as err:
            make_zoo(experts=[ffn_from(source)])
        assert "pytorch_model.bin" in one_line(err) and "not safetensors" in str(err.value)


def test_ffn_from_missing_path(tmp_path):
    with pytest.raises(ZooError) as err:
        make_zoo(experts=[ffn_from(tmp_path / "missing")])
    assert str(tmp_path / "missing") in one_line(err) and "does not exist" in str(err.value)


def test_ffn_from_garbage_safetensors(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!" * 4)
    with pytest.raises(ZooError) as err:
        make_zoo(experts=[ffn_from(tmp_path)])
    assert "model.safetensors" in one_line(err)


def test_ffn_from_checkpoint_of_other_shape(tmp_path):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=259)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(ZooError) as err:
        make_zoo(experts=[ffn_from(tmp_path / "wide")])
    msg = one_line(err)
    assert str(tmp_path / "wide") in msg and "model.layers.0.mlp." in msg and "same base" in msg
    assert ("96)" in msg and "128)" in msg) or ("(96," in msg and "(128," in msg)


def test_ffn_from_checkpoint_of_other_architecture(tmp_path):
    fresh("gpt2")[0].save_pretrained(tmp_path / "gpt2", safe_serialization=True)
    with pytest.raises(ZooError, match="has no tensor model.layers.0.mlp"):
        make_zoo(experts=[ffn_from(tmp_path / "gpt2")])


def test_from_a_folder_that_is_no_expert_folder(tmp_path):
    with pytest.raises(ZooError, match="not an expert folder"):
        make_zoo(experts=[{"name": "mp", "kind": "mlp", "from": str(tmp_path)}])


def test_from_an_expert_folder_of_another_kind(tmp_path):
    zoo = make_zoo(experts=[{"name": "lo", "kind": "lora"}])
    zoo.save_expert("lo", tmp_path / "lo")
    with pytest.raises(ZooError, match="holds a 'lora' expert.*kind: lora"):
        make_zoo(experts=[{"name": "mp", "kind": "mlp", "from": str(tmp_path / "lo")}])


# ---------------------------------------------------------------- saving

def test_save_into_non_zoo_folder_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me", encoding="utf-8")
    zoo = make_zoo(experts=[expert("a", "lora")])
    with pytest.raises(ZooError) as err:
        zoo.save(folder)
    assert str(folder) in one_line(err) and "not a zoo folder" in str(err.value)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary folder left behind


def test_save_onto_a_file_is_refused(tmp_path):
    target = tmp_path / "zoo"
    target.write_text("a file", encoding="utf-8")
    with pytest.raises(ZooError, match="not a zoo folder"):
        make_zoo().save(target)
    assert target.read_text(encoding="utf-8") == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]


def test_save_into_empty_folder_and_over_a_zoo(tmp_path, ids):
    folder = tmp_path / "zoo"
    folder.mkdir()
    first = make_zoo(experts=[expert("a", "lora")])
    first.save(folder)
    second = make_zoo(experts=[expert("b", "mlp")])
    perturb(second)
    second.save(folder)  # a zoo folder is replaced
    assert sorted(p.name for p in folder.iterdir()) == ["experts.safetensors", "zoo.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zoo"]
    loaded = expertzoo.load(folder)
    assert loaded.expert_names == ["b"]
    assert_close(logits(loaded, ids), logits(second, ids), atol=1e-6)


def test_failed_save_keeps_previous_zoo(saved_zoo, monkeypatch):
    folder, ids, expected = saved_zoo
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(expertzoo.io.zoo_folder, "save_file", broken)
    other = make_zoo(experts=[expert("b", "mlp")])
    with pytest.raises(OSError, match="disk full"):
        other.save(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["zoo"]  # the half-written copy is gone
    monkeypatch.undo()
    loaded = expertzoo.load(folder)
    assert loaded.expert_names == ["a"]
    assert_close(logits(loaded, ids), expected, atol=1e-6)


def test_a_save_killed_between_its_renames_is_recovered(tmp_path):
    """The swap renames the old zoo aside, then the new one in; a kill in between must not lose the zoo."""
    zoo = make_zoo(experts=[{"name": "a", "kind": "lora"}])
    zoo.save(tmp_path / "z")
    (tmp_path / "z").rename(tmp_path / ".z.old-12345")  # the state right after the first rename
    assert expertzoo.load(tmp_path / "z").expert_names == ["a"]
