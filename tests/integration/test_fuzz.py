"""Property-based fuzzing of configs, data files, expert folders and PEFT adapter folders: every failure is a
one-line ZooError naming the bad value — never another exception — and a failed build or load changes nothing."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

import expertzoo as ez
from expertzoo.data import read_documents, tokenize
from expertzoo.io.expert_folder import META, WEIGHTS
from expertzoo.io.peft import building_peft_model
from expertzoo.nn.sites import find_sites
from helpers import perturb

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["lora", "mlp", "ffn", "learned", "all",
                                                                              "mlp.down_proj", "attn", "0-1", "code"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)
expert = st.fixed_dictionaries({"name": st.one_of(st.sampled_from(["a", "b", "code"]), st.text(max_size=6)),
                                "kind": st.one_of(st.sampled_from(ez.EXPERTS.names()), st.text(max_size=5))},
                               optional={"rank": values, "alpha": values, "hidden": values, "from": values,
                                         "bogus": values})
router = st.fixed_dictionaries({}, optional={"kind": st.one_of(st.sampled_from(ez.ROUTERS.names()), values),
                                             "top_k": values, "null_experts": values, "granularity": values,
                                             "scope": values, "always_on_base": values, "experts": values})
configs = st.fixed_dictionaries({}, optional={"base": values, "sites": values, "layers": values,
                                              "experts": st.one_of(st.lists(expert, max_size=3), values),
                                              "router": st.one_of(router, values), "seed": values,
                                              "extra": values})


def _one_line(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text, repr(text)
    return text


@FUZZ
@given(configs)
@example({"router": {"\n": None}})  # a key with a control character once broke the one-line error
def test_fuzzed_configs_parse_or_fail_cleanly(raw):
    try:
        cfg = ez.load_config(raw)
    except ez.ZooError as err:
        _one_line(err)
        return
    assert ez.load_config(cfg.to_dict()) == cfg  # what parses round-trips


@pytest.fixture(scope="module")
def tiny():
    return ez.load_base("tiny:llama")


@FUZZ
@given(st.binary(max_size=300), st.sampled_from([".txt", ".jsonl"]))
def test_fuzzed_data_files(tmp_path_factory, tiny, blob, suffix):
    path = tmp_path_factory.mktemp("d") / f"data{suffix}"
    path.write_bytes(blob)
    try:
        docs = read_documents(path)
    except ez.ZooError as err:
        assert str(path) in _one_line(err)
        return
    assert docs and all(isinstance(d, dict) for d in docs)
    assert all(len(e.input_ids) == len(e.labels) <= 32 for e in tokenize(docs, tiny[1], 32))


@FUZZ
@given(st.lists(st.one_of(st.dictionaries(st.sampled_from(["text", "prompt", "completion", "x"]),
                                          st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=3),
                          values), max_size=5))
def test_fuzzed_jsonl_rows(tmp_path_factory, tiny, rows):
    path = tmp_path_factory.mktemp("j") / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    try:
        tokenize(read_documents(path), tiny[1], 16)
    except ez.ZooError as err:
        _one_line(err)


def _tensor(kind: str, shape: tuple[int, ...]) -> torch.Tensor:
    if kind == "nan":
        return torch.full(shape, float("nan"))
    if kind == "int":
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randn(shape).to(torch.float16 if kind == "half" else torch.float32)


@FUZZ
@given(st.sampled_from(["lora", "mlp"]), st.sampled_from(["ok", "nan", "int", "half"]),
       st.sampled_from(["right", "wrong_shape", "missing_key", "truncated", "garbage", "no_meta", "bad_meta",
                        "other_kind"]),
       st.tuples(st.integers(1, 9), st.integers(1, 9)), st.floats(0.0, 0.99), st.binary(max_size=64))
def test_fuzzed_expert_folders(tmp_path_factory, tiny, kind, dtype, damage, bad_shape, cut, junk):
    model, tok = tiny
    site = find_sites(model, ["mlp"], [0])[0]
    made = ez.EXPERTS.get(kind)(site=site, options={})
    folder = tmp_path_factory.mktemp("e")
    tensors = {f"{site.name}.{k}": _tensor(dtype, tuple(v.shape)) for k, v in made.state_dict().items()}
    if damage == "wrong_shape":
        key = next(iter(tensors))
        tensors[key] = torch.randn(*bad_shape)
    if damage == "missing_key":
        tensors.pop(next(iter(tensors)))
    save_file(tensors, folder / WEIGHTS)
    meta = {"kind": "mlp" if damage == "other_kind" and kind == "lora" else kind if damage != "other_kind" else "lora"}
    if damage != "no_meta":
        (folder / META).write_text("{nope" if damage == "bad_meta" else json.dumps(meta), encoding="utf-8")
    raw = (folder / WEIGHTS).read_bytes()
    if damage == "truncated":
        (folder / WEIGHTS).write_bytes(raw[: int(len(raw) * cut)])
    if damage == "garbage":
        (folder / WEIGHTS).write_bytes(b"\x80\x04" + junk + raw[:40])
    fresh = ez.EXPERTS.get(kind)(site=site, options={})
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    try:
        fresh.load_source(str(folder), site)
    except ez.ZooError as err:
        _one_line(err)
        assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing half-loaded
        return
    assert damage == "right" and dtype in ("ok", "half", "int"), (damage, dtype)
    assert all(torch.isfinite(v.float()).all() for v in fresh.state_dict().values())


def test_failed_build_writes_nothing(tmp_path: Path):
    from expertzoo.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: tiny:llama\nexperts: [{name: a, kind: lora, rank: -1}]\n")
    assert main(["build", str(cfg), "-o", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


# ---------------------------------------------------------------- PEFT adapter folders

ADAPTER_KEYS = ["peft_type", "r", "lora_alpha", "target_modules", "use_rslora", "rank_pattern", "alpha_pattern",
                "layers_to_transform", "fan_in_fan_out", "use_dora", "bias", "modules_to_save"]
odd_values = st.one_of(values, st.sampled_from([0, -1, 4, 10**9, 2**62, 10**400, 4.5, True, "4", "LORA", "q_proj",
                                                 ["q_proj"], ["nope"], {"q_proj": 3}, {"(": 2}, {"q_proj": 0},
                                                 float("inf"), float("nan"), None]))
CONFIG_DAMAGE = ["none", "missing_file", "junk", "non_utf8", "not_object", "drop", "set", "huge_r", "rank_mismatch",
                 "unknown_type", "elsewhere"]
TENSOR_DAMAGE = ["none", "nan", "inf", "int", "half", "wrong_shape", "missing_key", "b_rank", "truncated", "garbage",
                 "empty", "no_file", "bin_only"]
BENIGN_CONFIG, BENIGN_TENSORS = {"none"}, {"none", "int", "half"}


@pytest.fixture(scope="module")
def adapter_zoo(tmp_path_factory):
    """(zoo, config, tensors): a zoo at q_proj and down_proj of layer 0 with a LoRA expert `x` (perturbed), and a
    valid PEFT adapter for those modules, made and saved by peft itself (its config dict and tensors)."""
    root = tmp_path_factory.mktemp("peft")
    model, _ = ez.load_base("tiny:llama")
    torch.manual_seed(0)
    with building_peft_model():
        get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                         layers_to_transform=[0], init_lora_weights=False)).save_pretrained(root / "valid")
    config = json.loads((root / "valid" / "adapter_config.json").read_text(encoding="utf-8"))
    tensors = load_file(root / "valid" / "adapter_model.safetensors")
    assert len(tensors) == 4  # lora_A and lora_B at two modules
    model, tok = ez.load_base("tiny:llama")
    zoo = ez.build({"base": "tiny:llama", "sites": ["attn.q_proj", "mlp.down_proj"], "layers": [0],
                    "experts": [{"name": "x", "kind": "lora", "rank": 2}]}, model=model, tokenizer=tok)
    perturb(zoo)
    return zoo, config, tensors


def _damaged_tensors(tensors: dict[str, torch.Tensor], damage: str, pick: int, shape: tuple[int, ...]):
    out = dict(tensors)
    key = sorted(out)[pick % len(out)]
    if damage in ("nan", "inf"):
        t = out[key].clone()
        t.view(-1)[pick % t.numel()] = float(damage)
        out[key] = t
    elif damage == "int":
        out = {k: torch.zeros(v.shape, dtype=torch.int64) for k, v in out.items()}
    elif damage == "half":
        out = {k: v.half() for k, v in out.items()}
    elif damage == "wrong_shape":
        out[key] = torch.randn(*shape) if shape != tuple(out[key].shape) else torch.randn(*shape, 1)
    elif damage == "missing_key":
        del out[key]
    elif damage == "b_rank":  # B's rank differs from A's at one module
        b = sorted(k for k in out if "lora_B" in k)[pick % 2]
        out[b] = torch.randn(out[b].shape[0], out[b].shape[1] + 1 + pick % 3)
    return out


@FUZZ  # undamaged parts drawn more often, so that a fair share of the adapters are valid and load
@given(st.one_of(st.just("none"), st.sampled_from(CONFIG_DAMAGE), st.sampled_from(CONFIG_DAMAGE)),
       st.one_of(st.sampled_from(sorted(BENIGN_TENSORS)), st.sampled_from(TENSOR_DAMAGE), st.sampled_from(TENSOR_DAMAGE)),
       st.sampled_from(ADAPTER_KEYS), odd_values,
       st.integers(0, 10**6), st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple), st.floats(0.0, 0.99),
       st.binary(max_size=64))
def test_fuzzed_peft_adapter_folders(tmp_path_factory, adapter_zoo, config_damage, tensor_damage, key, value, pick,
                                     shape, cut, junk):
    zoo, valid_config, valid_tensors = adapter_zoo
    folder = tmp_path_factory.mktemp("a")
    cfg, tensors = dict(valid_config), _damaged_tensors(valid_tensors, tensor_damage, pick, shape)
    if config_damage == "drop":
        cfg.pop(key, None)
    elif config_damage == "set":
        cfg[key] = value
    elif config_damage == "huge_r":
        cfg["r"] = [10**9, 2**40, 10**400][pick % 3]
    elif config_damage == "rank_mismatch":
        cfg["r"] = [3, 5, 1][pick % 3] if pick % 2 else cfg["r"]
        cfg["rank_pattern"] = {} if pick % 2 else {["q_proj", "down_proj"][pick % 4 // 2]: 2 + pick % 2 * 3}
    elif config_damage == "unknown_type":
        cfg["peft_type"] = ["PROMPT_TUNING", "IA3", "lora", "", "LOHA", None][pick % 6]
    elif config_damage == "elsewhere":  # the adapter targets modules the model does not have
        cfg["target_modules"] = ["nope_proj"]
        tensors = {k.replace("self_attn.q_proj", "self_attn.nope_proj").replace("mlp.down_proj", "mlp.nope_proj"): v
                   for k, v in tensors.items()}
    text = json.dumps(cfg)  # NaN / Infinity as JSON reads them back
    blob = {"junk": junk, "non_utf8": b"\xff\xfe" + text.encode("utf-16-le"), "not_object": json.dumps(
        [value, cfg]).encode()}.get(config_damage, text.encode())
    if config_damage != "missing_file":
        (folder / "adapter_config.json").write_bytes(blob)
    weights = folder / "adapter_model.safetensors"
    save_file(tensors, weights)
    raw = weights.read_bytes()
    if tensor_damage == "truncated":
        weights.write_bytes(raw[: int(len(raw) * cut)])
    elif tensor_damage == "garbage":
        weights.write_bytes(b"\x80\x04" + junk + raw[:40])
    elif tensor_damage == "empty":
        weights.write_bytes(b"")
    elif tensor_damage == "no_file":
        weights.unlink()
    elif tensor_damage == "bin_only":
        weights.rename(folder / "adapter_model.bin")
    before = {k: v.clone() for k, v in zoo.state_dict().items()}
    config_before = zoo.zoo_config
    try:
        zoo.add_expert({"name": "new", "kind": "lora", "from": str(folder)})
    except ez.ZooError as err:
        event("adapter refused with a ZooError")
        assert str(folder) in _one_line(err), str(err)  # names the adapter folder or one of its files
        assert zoo.zoo_config == config_before and zoo.expert_names == ["x"]
        after = zoo.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert not (config_damage in BENIGN_CONFIG and tensor_damage in BENIGN_TENSORS), str(err)
        return
    assert config_damage in BENIGN_CONFIG | {"drop", "set"} and tensor_damage in BENIGN_TENSORS, \
        (config_damage, tensor_damage, key, value)
    event("adapter loaded")
    assert all(torch.isfinite(p).all() for p in zoo.expert_parameters("new"))
    zoo.remove_expert("new")
    after = zoo.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
