"""ZooConfig: parsing (dicts, YAML, `from`), defaults, sorted JSON round trip, and one-line ZooErrors that name
the bad value and the fix for every malformed field."""
from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

import expertzoo
from expertzoo import ExpertSpec, ZooConfig, ZooError, load_config
from expertzoo.config import parse_config
from helpers import make_zoo

FULL = {
    "base": "tiny:llama",
    "sites": ["mlp", "attn"],
    "layers": "0-1",
    "experts": [{"name": "code", "kind": "lora", "rank": 4}, {"name": "math-2", "kind": "mlp", "hidden": 8},
                {"name": "ft_1", "kind": "ffn", "from": "/somewhere/ft"}],
    "router": {"kind": "learned", "top_k": 1, "null_experts": 2, "granularity": "sequence", "noise": 0.1},
    "seed": 3,
}


def test_defaults():
    cfg = load_config({})
    assert (cfg.base, cfg.sites, cfg.layers, cfg.experts, cfg.seed) == ("smollm2-135m", ["mlp"], "all", [], 0)
    r = cfg.router
    assert (r.kind, r.top_k, r.null_experts, r.always_on_base, r.granularity, r.scope) == \
        ("learned", 2, 0, False, "token", "layer")


def test_full_config_parses_options_into_kinds():
    cfg = load_config(FULL)
    code, math, ft = cfg.experts
    assert (code.kind, code.options.rank, code.options.alpha) == ("lora", 4, 16.0)
    assert math.options.model_dump() == {"hidden": 8, "activation": "silu"}
    assert (ft.source, ft.options.model_dump()) == ("/somewhere/ft", {})
    assert cfg.router.options.noise == 0.1 and cfg.router.null_experts == 2
    assert cfg.layer_indices(2) == [0, 1]


def test_json_round_trip_is_sorted_and_stable():
    cfg = load_config(FULL)
    text = cfg.to_json()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True) + "\n"
    assert data["experts"][2]["from"] == "/somewhere/ft"  # saved under the user's key
    again = load_config(data)
    assert again == cfg and again.to_json() == text


def test_config_is_frozen_and_replace_revalidates():
    cfg = load_config(FULL)
    with pytest.raises(ValidationError):
        cfg.seed = 5
    assert cfg.replace(seed=5).seed == 5 and cfg.seed == 3
    with pytest.raises(ZooError, match="'Bad'"):
        cfg.replace(experts=[{"name": "Bad", "kind": "lora"}])


def test_yaml_file(tmp_path):
    path = tmp_path / "zoo.yaml"
    path.write_text("base: tiny:llama\nsites: [mlp]\nlayers: [1]\nexperts:\n  - {name: code, kind: lora, rank: 2}\n"
                    "router: {kind: fixed, experts: [code]}\n", encoding="utf-8")
    cfg = load_config(path)
    assert cfg.experts[0].options.rank == 2 and cfg.router.options.experts == ["code"]
    assert load_config(str(path)) == cfg
    zoo = expertzoo.build(path)  # base loaded from the config
    assert [s.name for s in zoo.sites] == ["model.layers.1.mlp"] and zoo.expert_names == ["code"]


def test_expert_spec_accepts_spec_and_from_alias():
    spec = ExpertSpec(**{"name": "a", "kind": "ffn", "from": "x"})
    assert spec.source == "x" and spec.to_dict() == {"name": "a", "kind": "ffn", "from": "x"}
    assert load_config({"experts": [spec]}).experts[0] == spec
    assert isinstance(parse_config(load_config({})), ZooConfig)


def test_build_uses_seed():
    a = make_zoo(experts=[{"name": "a", "kind": "lora"}], seed=1)
    b = make_zoo(experts=[{"name": "a", "kind": "lora"}], seed=1)
    c = make_zoo(experts=[{"name": "a", "kind": "lora"}], seed=2)
    sa, sb, sc = a.zoo_state_dict(), b.zoo_state_dict(), c.zoo_state_dict()
    key = "model.layers.0.mlp.experts.a.lora_A"
    assert (sa[key] == sb[key]).all() and not (sa[key] == sc[key]).all()


# ---------------------------------------------------------------- errors: one line, name the value, say the fix

def error_of(raw) -> str:
    with pytest.raises(ZooError) as err:
        load_config(raw)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_expert_kind():
    msg = error_of({"experts": [{"name": "a", "kind": "lorra"}]})
    assert "'lorra'" in msg and "ffn, lora, mlp" in msg


def test_unknown_router_kind():
    msg = error_of({"router": {"kind": "smart"}})
    assert "'smart'" in msg and all(k in msg for k in ("fixed", "learned", "uniform"))


@pytest.mark.parametrize("raw,key", [
    ({"experts": [{"name": "a", "kind": "lora", "rnk": 4}]}, "rnk"),
    ({"experts": [{"name": "a", "kind": "ffn", "rank": 4}]}, "rank"),
    ({"router": {"kind": "learned", "topk": 2}}, "topk"),
    ({"router": {"kind": "uniform", "noise": 0.1}}, "noise"),
    ({"sitez": ["mlp"]}, "sitez"),
])
def test_unknown_option_key(raw, key):
    msg = error_of(raw)
    assert f"unknown key '{key}'" in msg and "remove it" in msg


@pytest.mark.parametrize("name", ["Code!", "Code", "my expert", "", "a.b", "code\n"])
def test_bad_expert_name(name):
    msg = error_of({"experts": [{"name": name, "kind": "lora"}]})
    assert repr(name) in msg and "[a-z0-9_-]+" in msg


def test_bad_expert_name_suggests_a_fix():
    assert "e.g. 'code'" in error_of({"experts": [{"name": "Code!", "kind": "lora"}]})


def test_duplicate_names():
    msg = error_of({"experts": [{"name": "a", "kind": "lora"}, {"name": "a", "kind": "mlp"}]})
    assert "'a'" in msg and "twice" in msg


@pytest.mark.parametrize("layers", ["x", "1-", "0..3", [-1], [], "-1"])
def test_malformed_layers(layers):
    msg = error_of({"layers": layers})
    assert "layers" in msg


def test_backwards_layer_range():
    with pytest.raises(ZooError, match="'3-1' runs backwards; write it as '1-3'"):
        load_config({"layers": "3-1"}).layer_indices(4)


@pytest.mark.parametrize("kind", ["uniform", "fixed"])
def test_null_experts_need_learned_router(kind):
    msg = error_of({"router": {"kind": kind, "null_experts": 2}})
    assert f"'{kind}'" in msg and "null_experts: 0" in msg


@pytest.mark.parametrize("router,field", [({"top_k": 0}, "top_k"), ({"null_experts": -1}, "null_experts"),
                                          ({"granularity": "word"}, "granularity"), ({"scope": "model"}, "scope")])
def test_bad_router_values(router, field):
    assert f"router.{field}" in error_of({"router": router})


def test_fixed_router_lists_unknown_expert():
    msg = error_of({"experts": [{"name": "a", "kind": "lora"}], "router": {"kind": "fixed", "experts": ["b"]}})
    assert "'b'" in msg and "['a']" in msg


@pytest.mark.parametrize("sites", [[], ["mlp", "mlp"], ["mlp..x"], ["1mlp"], ["mlp\n"]])
def test_bad_sites(sites):
    assert "sites" in error_of({"sites": sites})


@pytest.mark.parametrize("raw", [[1, 2], "not-a-mapping-but-no-file", 5, None])
def test_config_must_be_a_mapping(raw):
    with pytest.raises(ZooError):
        load_config(raw)


def test_expert_must_be_a_mapping():
    assert "mapping" in error_of({"experts": ["lora"]})
