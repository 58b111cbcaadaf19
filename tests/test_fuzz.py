"""Property-based fuzzing of configs, data files and expert folders: every failure is a one-line ZooError
naming the bad value — never another exception — and a failed build writes nothing."""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import expertzoo as ez
from expertzoo.data import read_documents, tokenize
from expertzoo.experts.folder import META, WEIGHTS
from expertzoo.sites import find_sites

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
