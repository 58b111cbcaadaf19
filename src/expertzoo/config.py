"""ZooConfig and its parts: frozen pydantic models, validated when built, saved as sorted JSON (zoo.json)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ZooError
from .registry import EXPERTS, ROUTERS

NAME_RE = re.compile(r"^[a-z0-9_-]+$")
LAYERS_RE = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
SITE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def as_dict(options: Any) -> Any:
    """Kind options as a plain mapping (a validated Options model is dumped; anything else is left to validation)."""
    return options.model_dump() if isinstance(options, BaseModel) else options


def check_sites(v: list[str]) -> list[str]:
    for s in v:
        if not SITE_RE.fullmatch(s):
            raise ValueError(f"site {s!r} is malformed; use mlp, attn, or a module path such as mlp.down_proj")
    if len(set(v)) != len(v):
        raise ValueError(f"sites {v} repeat a site; list each once")
    return v


def check_layers(v: Any) -> Any:
    if isinstance(v, str) and v != "all" and not LAYERS_RE.match(v):
        raise ValueError(f"layers {v!r} is malformed; use all, a list like [0, 3], or a range like '12-29'")
    if isinstance(v, list) and not v:
        raise ValueError("layers [] is empty; use all or list at least one layer")
    if isinstance(v, list) and any(i < 0 for i in v):
        raise ValueError(f"layers {v} has a negative index; layers count from 0")
    return v


def layer_indices(layers: Union[Literal["all"], list[int], str], n_layers: int) -> list[int]:
    """`all`, a list or a range string as sorted layer indices, checked against a model of `n_layers` layers."""
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, list):
        out = sorted(set(layers))
    else:
        out = sorted({i for part in layers.split(",") for i in _span(part)})
    bad = [i for i in out if i >= n_layers]
    if bad:
        raise ZooError(f"layer {bad[0]} does not exist: the base has layers 0-{n_layers - 1}; fix `layers`")
    return out


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        fixed = re.sub(r"[^a-z0-9_-]+", "_", str(name).lower()).strip("_") or "expert"
        raise ValueError(f"expert name {name!r} must match [a-z0-9_-]+; rename it, e.g. {fixed!r}")
    return name


class ExpertSpec(Frozen):
    """One expert: `{name, kind, from?, sites?, layers?, **kind options}`; options are checked by the kind's own
    Options model. `sites` / `layers` place the expert (None: the zoo's own `sites` / `layers`); `at`, when set,
    keeps it at only these site names of them (module paths such as model.layers.3.mlp; per-site pruning writes it)."""

    name: str
    kind: str
    source: str | None = None
    sites: list[str] | None = None
    layers: Union[Literal["all"], list[int], str, None] = None
    at: list[str] | None = None
    options: Any = Field(default_factory=dict)  # the kind's own Options model once validated: `spec.options.rank`
    # texts this expert should (not) handle, for routers initialised from prompts (router `init: hidden`, ...)
    positive_prompts: list[str] = Field(default_factory=list)
    negative_prompts: list[str] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, raw: Any) -> Any:
        if isinstance(raw, ExpertSpec):
            return raw.model_dump()
        if not isinstance(raw, dict):
            raise ValueError(f"an expert must be a mapping like {{name: code, kind: lora}}, got {raw!r}")
        raw = dict(raw)
        out = {k: raw.pop(k) for k in ("name", "kind") if k in raw}
        if "from" in raw:
            out["source"] = raw.pop("from")
        elif "source" in raw:
            out["source"] = raw.pop("source")
        out.update({k: raw.pop(k) for k in ("positive_prompts", "negative_prompts", "sites", "layers", "at") if k in raw})
        out["options"] = {**as_dict(raw.pop("options", {})), **raw}
        return out

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("sites [] is empty; list at least one site, or leave `sites` out for the zoo's")
        return None if v is None else check_sites(v)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return None if v is None else check_layers(v)

    @field_validator("at")
    @classmethod
    def _at(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("at [] places the expert nowhere; list its site names, or remove the expert")
        return v

    @model_validator(mode="after")
    def _kind_options(self) -> "ExpertSpec":
        object.__setattr__(self, "options", EXPERTS.get(self.kind).Options(**as_dict(self.options)))
        return self

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": self.kind, **self.options.model_dump()}
        if self.source is not None:
            d["from"] = self.source
        if self.sites is not None:
            d["sites"] = list(self.sites)
        if self.layers is not None:
            d["layers"] = self.layers
        if self.at is not None:
            d["at"] = list(self.at)
        d.update({k: list(v) for k, v in (("positive_prompts", self.positive_prompts),
                                          ("negative_prompts", self.negative_prompts)) if v})
        return d


class RouterSpec(Frozen):
    """The router: kind, shared options, and the kind's own options (e.g. `experts` for `fixed`)."""

    kind: str = "learned"
    top_k: int = Field(2, ge=1)
    null_experts: int = Field(0, ge=0)
    always_on_base: bool = False
    granularity: Literal["token", "sequence"] = "token"
    scope: Literal["layer", "global"] = "layer"
    options: Any = Field(default_factory=dict)  # the kind's own Options model once validated: `spec.options.top_p`

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, raw: Any) -> Any:
        if isinstance(raw, RouterSpec):
            return raw.model_dump()
        if not isinstance(raw, dict):
            raise ValueError(f"router must be a mapping like {{kind: learned, top_k: 2}}, got {raw!r}")
        common = set(cls.model_fields) - {"options"}
        out = {k: v for k, v in raw.items() if k in common}
        extra = {k: v for k, v in raw.items() if k not in common and k != "options"}
        out["options"] = {**as_dict(raw.get("options", {})), **extra}
        return out

    @model_validator(mode="after")
    def _kind_options(self) -> "RouterSpec":
        router_cls = ROUTERS.get(self.kind)
        object.__setattr__(self, "options", router_cls.Options(**as_dict(self.options)))
        if self.null_experts and not router_cls.supports_null:
            raise ValueError(f"router kind {self.kind!r} has no null-expert slots; set null_experts: 0 or use kind: learned")
        if self.always_on_base and not router_cls.supports_always_on_base:
            raise ValueError(f"router kind {self.kind!r} has no base slot; set always_on_base: false or use kind: "
                             "learned or uniform")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(exclude={"options"})
        return {**d, **self.options.model_dump()}


class ZooConfig(Frozen):
    """A whole zoo: which base, where experts sit, which experts, which router."""

    base: str = "smollm2-135m"
    sites: list[str] = Field(default_factory=lambda: ["mlp"], min_length=1)
    layers: Union[Literal["all"], list[int], str] = "all"
    experts: list[ExpertSpec] = Field(default_factory=list)
    router: RouterSpec = Field(default_factory=RouterSpec)
    seed: int = 0
    # the network outside the sites: the base's, or averaged over the fine-tuned checkpoints (Branch-Train-Mix)
    non_expert_params: Literal["base", "average"] = "base"
    # the base's projections quantized (weight-only; experts and routers stay in full precision): io/quantize.py
    quantize: Literal["none", "int8", "int4"] = "none"

    @field_validator("sites")
    @classmethod
    def _sites(cls, v: list[str]) -> list[str]:
        return check_sites(v)

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: Any) -> Any:
        return check_layers(v)

    @model_validator(mode="after")
    def _unique(self) -> "ZooConfig":
        names = [e.name for e in self.experts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"expert name {dup[0]!r} is used twice; give each expert its own name")
        for name in getattr(self.router.options, "experts", None) or []:
            if name not in names:
                raise ValueError(f"router lists expert {name!r}, which is not in experts {names}; add it or drop it")
        return self

    @model_validator(mode="after")
    def _router_takes_experts(self) -> "ZooConfig":
        ROUTERS.get(self.router.kind).check_experts(self.experts)  # e.g. smear: LoRA experts of one rank
        return self

    def layer_indices(self, n_layers: int) -> list[int]:
        """The zoo's own layers (where experts without `layers` sit), checked against a model of `n_layers` layers."""
        return layer_indices(self.layers, n_layers)

    def placement(self, spec: ExpertSpec, n_layers: int) -> tuple[list[str], list[int]]:
        """Where expert `spec` sits: its own `sites` / `layers`, else the zoo's."""
        layers = spec.layers if spec.layers is not None else self.layers
        try:
            indices = layer_indices(layers, n_layers)
        except ZooError as err:
            raise ZooError(f"expert {spec.name!r}: {err}") from None
        return list(spec.sites if spec.sites is not None else self.sites), indices

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "sites": list(self.sites),
            "layers": self.layers,
            "experts": [e.to_dict() for e in self.experts],
            "router": self.router.to_dict(),
            "seed": self.seed,
            "non_expert_params": self.non_expert_params,
            **({"quantize": self.quantize} if self.quantize != "none" else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes: Any) -> "ZooConfig":
        return parse_config({**self.to_dict(), **changes})


def _span(part: str) -> range:
    a, _, b = part.strip().partition("-")
    lo, hi = int(a), int(b or a)
    if hi < lo:
        raise ZooError(f"layer range {part.strip()!r} runs backwards; write it as '{hi}-{lo}'")
    return range(lo, hi + 1)


def one_line(err: ValidationError) -> str:
    """The first pydantic error as one line: where it is, what is wrong."""
    e = err.errors()[0]
    where = ".".join(_shown(p) for p in e["loc"]) or "config"
    msg = " ".join(e["msg"].removeprefix("Value error, ").split("\n"))
    if e["type"] == "extra_forbidden":
        return f"unknown key {e['loc'][-1]!r} at {where}; remove it or check its spelling"
    if e["type"] == "missing":
        return f"missing key {where}; add it"
    return f"{where}: {msg} (got {e.get('input')!r})" if e["type"] not in ("value_error", "assertion_error") else f"{where}: {msg}"


def _shown(part: object) -> str:
    """One part of an error's location; a key with control characters is shown quoted so the error stays one line."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def parse_config(raw: dict[str, Any] | ZooConfig) -> ZooConfig:
    if isinstance(raw, ZooConfig):
        return raw
    if not isinstance(raw, dict):
        raise ZooError(f"a zoo config must be a mapping of keys (base, sites, experts, router), got {type(raw).__name__}")
    try:
        return ZooConfig(**raw)
    except ValidationError as err:
        raise ZooError(f"bad zoo config: {one_line(err)}") from None
    except TypeError as err:
        raise ZooError(f"bad zoo config: {err}") from None


def load_config(source: dict[str, Any] | str | Path | ZooConfig) -> ZooConfig:
    """A config from a dict, a ZooConfig, or a YAML/JSON file."""
    if not isinstance(source, (str, Path)):
        return parse_config(source)
    path = Path(source)
    if not path.is_file():
        raise ZooError(f"config file {str(path)!r} does not exist; pass the path of a YAML zoo config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ZooError(f"config file {str(path)!r} is not valid YAML{where}; fix its syntax") from None
    except UnicodeDecodeError:
        raise ZooError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8") from None
    return parse_config(raw)
